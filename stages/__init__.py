"""Thin DVC stage entry points over `domlora.pipeline.stages` (run as `python -m stages.<name>`)."""

"""Thin DVC stage entry points over `domlora.pipeline` (run as `python -m stages.<name>`)."""

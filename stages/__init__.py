"""Thin DVC stage entry points (run as `python -m stages.<name>`): each parses its arguments and calls its stage's
function, `domlora.pipeline.stages.<name>` (the checkpoint study's: `domlora.studies.checkpoints`)."""

"""One module per grid stage, with path-level I/O; the DVC stage scripts (`stages/*.py`) and the Prefect flow
call these: `prepare_data`, `probe`, `select`, `train`, `evaluate` (the checkpoint study's stage lives with
the study, `studies.checkpoints.checkpoints_stage`).

Each stage reads only its declared inputs, validates them before any heavy work, and replaces its outputs
atomically (a failure leaves the previous outputs intact). Import from the stage's module; the names below
are re-exported lazily so that one stage does not load the others.
"""
from __future__ import annotations

_EXPORTS = {"prepare_data_stage": "prepare_data", "probe": "probe", "probe_stage": "probe",
            "write_layer_csv": "probe", "PROBE_FILES": "probe", "select_placement": "select",
            "select_stage": "select", "run_model_peer": "select", "peer_options": "select",
            "train_stage": "train", "write_loss_csv": "train", "evaluate_stage": "evaluate"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

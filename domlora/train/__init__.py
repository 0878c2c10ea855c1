"""Training: the recipe and run record (`config`), the step plan (`plan`), the processes a run trains on
(`distributed`), resumable checkpoints (`checkpoints`) and the one explicit loop (`loop.train`).

The training regimes built on the loop (plain SFT, sparse-B, GRPO) are looked up by name in
`domlora.regimes`. Import from the modules themselves; the names below are re-exported lazily so that
`import domlora.train.config` does not load the loop.
"""
from __future__ import annotations

_EXPORTS = {"TrainConfig": "config", "TrainRecord": "config", "TrainingDiverged": "config", "StepPlan": "plan",
            "close_process_group_at_exit": "distributed", "train": "loop"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

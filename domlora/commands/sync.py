"""`domlora sync`: log results on disk to MLflow (after a tracking outage, or into another server)."""
from __future__ import annotations

import argparse

from domlora.pipeline.params import load_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.tracking import PENDING, make_tracker

HELP = "log every finished cell of the active grid to MLflow (idempotent)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--root", default=".", help="repository root")
    p.add_argument("--pending-only", action="store_true", help="only cells whose logging failed before")
    p.add_argument("--grid-id", default=None,
                   help="the grid execution to log under (a Prefect grid: prefect-<flow run id>; "
                        "default $DOMLORA_GRID_ID, else the profile and params hash)")


def run(a: argparse.Namespace) -> int:
    params = load_params(a.params)
    layout = Layout(a.root)
    tracker = make_tracker(params, enabled=True, grid_id=a.grid_id)
    n = 0
    for cell in params.cells():
        run_dir = layout.run_dir(cell)
        if not layout.train_metrics(cell).is_file():
            continue
        if a.pending_only and not (run_dir / PENDING).exists():
            continue
        tracker.log_cell(cell=cell, params=params, layout=layout, stage="train")
        n += 1
    print(f"synced {n} cells to {getattr(tracker, 'uri', params.tracking.uri)} (grid {tracker.grid_id})")
    return 0

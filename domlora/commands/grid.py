"""`domlora grid`: write grid.yaml, the stage instances of the active profile that dvc.yaml expands."""
from __future__ import annotations

import argparse

from domlora.pipeline.grid import check_grid, grid_doc, write_grid
from domlora.pipeline.params import load_params

HELP = "write grid.yaml (the cells of the active profile, for dvc.yaml) from params.yaml; --check only compares"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (grid.yaml goes beside it)")
    p.add_argument("--check", action="store_true", help="only check that grid.yaml is current (exit 2 if not)")


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    params = load_params(a.params)
    root = Path(a.params).resolve().parent
    if a.check:
        check_grid(params, root)
        print(f"grid.yaml is current: {len(grid_doc(params)['cells'])} cells of profile {params.profile}")
        return 0
    doc = grid_doc(params)
    path = write_grid(params, root)
    print(f"wrote {path}: {len(doc['cells'])} cells, {len(doc['probes'])} probes, {len(doc['selects'])} selects "
          f"(profile {params.profile})")
    return 0

"""`domlora profile`: show or switch the active profile of params.yaml."""
from __future__ import annotations

import argparse

from domlora.errors import ConfigError
from domlora.pipeline.grid import write_grid
from domlora.pipeline.params import load_params, read_params_file, use_profile

HELP = "show the profiles of params.yaml, or make one active (`domlora profile use paper`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "use"], nargs="?", default="show", help="show (default) or use")
    p.add_argument("name", nargs="?", help="profile to make active (with `use`)")
    p.add_argument("--params", default="params.yaml", help="params file")


def run(a: argparse.Namespace) -> int:
    if a.action == "use":
        if not a.name:
            raise ConfigError("`domlora profile use` needs a profile name")
        use_profile(a.params, a.name)
    active = load_params(a.params)
    if a.action == "use":
        from pathlib import Path

        print(f"wrote {write_grid(active, Path(a.params).resolve().parent)}")
    for name in (read_params_file(a.params).get("profiles") or {}):
        p = load_params(a.params, profile=name)
        mark = "*" if name == active.profile else " "
        print(f"{mark} {name:10s} {len(p.cells()):4d} cells  models={p.grid.models} datasets={p.grid.datasets}")
    return 0

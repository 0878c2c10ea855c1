"""grid.yaml: the stage instances of the active profile, written from params.yaml for dvc.yaml to expand.

DVC's `matrix:` can only take the full product of its axes, while a grid here skips cells (a
method restricted to some models) and lets a select read another dataset's probe (the paper's
"probe once per backbone"). So the grid is computed once, in Python (`Params.cells()`), and
written to grid.yaml; dvc.yaml expands it with `foreach:` over its mappings, whose keys are the
stage suffixes (`train@smol-arith-domlora-0`). Every stage script checks that grid.yaml is the
one params.yaml gives, so a stale file is an error naming the fix, never a silent wrong grid.

    domlora grid            # rewrite grid.yaml (`domlora profile use` and `make repro` do it too)
"""
from __future__ import annotations

import os
from pathlib import Path

from domlora.errors import ConfigError
from domlora.io import write_text
from domlora.pipeline.params import Params, load_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.tune import sweeps, tunes

GRID_FILE = "grid.yaml"
HEADER = ("# Generated from params.yaml by `domlora grid` (also run by `domlora profile use` and `make repro`):\n"
          "# the stage instances of the active profile that dvc.yaml expands. Do not edit.\n")


def grid_doc(params: Params) -> dict:
    """The stage instances of a profile: datasets, probes, selects, sweeps and tunes (learning rate per budget
    class), cells and base evaluations.

    A cell's `lr_from` is the file its learning rate comes from: its budget class's tune output, or (a method
    without a class) its placement, already a dependency, so that DVC sees no new one.
    """
    layout = Layout(Path("."))
    cells = params.cells()
    models = [m for m in params.grid.models if any(c.model == m for c in cells)]
    probed = list(dict.fromkeys(params.grid.probe_models + models))
    selects: dict[str, dict] = {}
    for c in cells:
        key = f"{c.model}-{c.dataset}-{c.method}"
        selects.setdefault(key, {"model": c.model, "dataset": c.dataset, "method": c.method,
                                 "probe": params.select_probe(c.dataset)})
    return {
        "profile": params.profile,
        "datasets": list(params.grid.probe_datasets),
        "probes": {f"{m}-{d}": {"model": m, "dataset": d} for m in probed for d in params.grid.probe_datasets},
        "selects": selects,
        "sweeps": {s.id: {"model": s.model, "dataset": s.dataset, "method": s.method, "lr": f"lr{s.index}",
                          "budget": params.methods[s.method].budget} for s in sweeps(params)},
        "tunes": {f"{m}-{d}-{b}": {"model": m, "dataset": d, "budget": b} for m, d, b in tunes(params)},
        "cells": {c.id: {"model": c.model, "dataset": c.dataset, "method": c.method, "seed": c.seed,
                         "lr_from": _lr_from(params, layout, c)} for c in cells},
        "bases": {f"{m}-{d}": {"model": m, "dataset": d} for m in models for d in params.grid.datasets},
        "checkpoint_studies": {f"{m}-{d}": {"model": m, "dataset": d} for m, d in params.checkpoint_studies()},
    }


def _lr_from(params: Params, layout, cell) -> str:
    budget = params.methods[cell.method].budget
    path = layout.tune_json(cell.model, params.tune_dataset(cell.dataset), budget) if budget and params.tune else \
        layout.placement(cell.model, cell.dataset, cell.method)
    return path.as_posix()


def render(params: Params) -> str:
    import yaml

    return HEADER + yaml.safe_dump(grid_doc(params), sort_keys=False, default_flow_style=None, width=120)


def write_grid(params: Params, root: str | os.PathLike = ".") -> Path:
    """Write grid.yaml for `params` (atomically); returns its path."""
    return write_text(Path(root) / GRID_FILE, render(params))


def check_grid(params: Params, root: str | os.PathLike = ".") -> None:
    """Raise unless grid.yaml is the one `params` gives (dvc.yaml would expand a stale grid)."""
    import yaml

    path = Path(root) / GRID_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; fix: run `domlora grid` (it writes the grid of the active profile "
                          "for dvc.yaml)")
    try:
        have = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix: run `domlora grid`") from None
    want = grid_doc(params)
    if have != want:
        have = have if isinstance(have, dict) else {}
        what = [k for k in dict.fromkeys([*want, *have]) if have.get(k) != want.get(k)]
        raise ConfigError(f"{path} is stale: its {', '.join(what)} differ from params.yaml's profile "
                          f"{params.profile!r}; fix: run `domlora grid` and then `dvc repro` again")


def stage_params(params_path: str | os.PathLike, profile: str | None, root: str | os.PathLike) -> Params:
    """What a DVC stage script loads: the profile, and (for the active one) the check that grid.yaml is current."""
    params = load_params(params_path, profile=profile)
    if profile is None:
        check_grid(params, root)
    return params

"""Each method at its own best learning rate, chosen on a validation split carved from the training data.

Placements are compared within tiers of (nearly) equal trainable parameters (a profile's `tune.budgets`:
e.g. one module at rank 64, 1.5% or 16% of vanilla LoRA, full LoRA). For each model x dataset x tier:

- sweep (`pipeline.stages.sweep.sweep_stage`): every method of the tier is trained at every rate of the
  tier's log grid, at the tuning seed, for the tier's first candidate step count, on the training split
  minus its last `tune.val_samples` samples; the held-out NLL of those last samples (the validation split:
  never the evaluation split, never trained on) is written per run;
- tune (`pipeline.stages.tune.tune_stage`): each method's rate is the one with its lowest validation NLL (a
  diverged run counts as infinite; a tie goes to the smaller rate). A rate at an edge of the grid is not trusted: the stage
  trains the method one grid step further out, up to the tier's `extend` times, and fails with the fix when
  the rate still sits at an edge. Then the tier's step count: the first candidate (`steps`) at which every
  method's tuning run at its chosen rate has flattened by the report's criterion (`FLAT_SHARE`), decided
  from training losses only, before any evaluation score exists. A tier with a `reference` also checks
  that its methods' trainable parameters differ by at most 15%;
- every training run of the tier (all seeds) then uses the method's rate, the tier's step count and the
  same training samples (`cell_overrides`); with `tune.reuse_from`, one dataset's sweep sets the rates of
  all datasets (every dataset still keeps its validation split out of training).

Run as: python -m stages.sweep --run smol-arith-dom-lr0 ; python -m stages.tune --budget smol-arith-module
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.io import read_json
from domlora.pipeline.params import split_id

logger = logging.getLogger(__name__)

RULE = ("each method's lowest validation NLL (tuning seed; a diverged run counts as infinite; at an edge of the grid "
        "the grid is extended)")
FLAT_SHARE = 0.1
"""a run has flattened when its last quarter of steps brought at most this share of its loss improvement (the
report's criterion, `placement_report.FLAT_SHARE`)"""


@dataclass(frozen=True)
class Sweep:
    """One sweep run: a method of a budget class at one candidate learning rate (`sweep@<id>`)."""

    model: str
    dataset: str
    method: str
    index: int
    """position of the learning rate in the class's `lrs`"""

    @property
    def id(self) -> str:
        return f"{self.model}-{self.dataset}-{self.method}-lr{self.index}"

    @classmethod
    def parse(cls, run_id: str) -> Sweep:
        return cls(*split_id(run_id, what="sweep", form="MODEL-DATASET-METHOD-lrN", prefix="lr"))


def sweeps(params) -> list[Sweep]:
    """The sweep runs of a profile: model x dataset x every budget method of the grid x its class's lrs."""
    if params.tune is None:
        return []
    out = []
    for model in params.grid.models:
        for dataset in dict.fromkeys(params.tune_dataset(d) for d in params.grid.datasets):
            for method in params.grid.methods:
                m = params.methods[method]
                if m.budget is None or not m.runs_on(model):
                    continue
                out += [Sweep(model, dataset, method, i) for i in range(len(params.tune.budgets[m.budget].lrs))]
    return out


def tunes(params) -> list[tuple[str, str, str]]:
    """(model, dataset, budget) of every class with a method in the grid."""
    if params.tune is None:
        return []
    return [(m, d, b) for m in params.grid.models for d in dict.fromkeys(params.tune_dataset(x) for x in
                                                                         params.grid.datasets)
            for b in params.tune.budgets if any(params.methods[x].runs_on(m) for x in params.budget_methods(b))]


def check_sweep(params, sweep: Sweep) -> None:
    if sweep not in sweeps(params):
        raise ConfigError(f"sweep {sweep.id} is not a sweep run of profile {params.profile!r}; its runs: "
                          f"{', '.join(s.id for s in sweeps(params)[:6])}{' ...' if len(sweeps(params)) > 6 else ''}")


def sweep_config(params, method: str, dataset: str, lr: float):
    """The `TrainConfig` of a sweep run: the method's recipe at `lr`, the tuning seed, the carved training split."""
    cfg = params.train_config(method, seed=params.tune.seed)
    cfg = cfg.replace(lr=float(lr), limit_samples=params.tuned_samples(dataset), save_every=0)
    steps = params.tune.budgets[params.methods[method].budget].steps
    return cfg.replace(max_steps=steps[0]) if steps else cfg


def flat_share(loss: list) -> float | None:
    """The share of a run's loss improvement that its last quarter of steps brought (None: too few steps).

    (mean over the third quarter - mean over the last) / (mean over the first - mean over the last), on the
    per-step training loss; quarter means smooth the noise of small batches.
    """
    vals = [v for v in loss if isinstance(v, (int, float)) and math.isfinite(v)]
    q = len(vals) // 4
    if q < 2:
        return None
    first, third, last = (statistics.fmean(vals[:q]), statistics.fmean(vals[-2 * q:-q]),
                          statistics.fmean(vals[-q:]))
    return (third - last) / (first - last) if first > last else None


def is_flat(loss: list) -> bool:
    """The report's criterion: the last quarter brought at most `FLAT_SHARE` of the improvement (or none at all)."""
    share = flat_share(loss)
    return share is None or share <= FLAT_SHARE


def choose_rate(nll: dict[float, float | None]) -> float:
    """The rate with the lowest validation NLL (None / non-finite: diverged, counts as infinite; ties: smaller)."""
    return min(nll, key=lambda lr: (math.inf if nll[lr] is None or not math.isfinite(nll[lr]) else nll[lr], lr))


def extend_grid(lrs: list[float], best: float) -> float | None:
    """The next rate beyond the edge `best` sits at, one grid step out (None: `best` is interior)."""
    lrs = sorted(lrs)
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    if best == lrs[0]:
        return lrs[0] * lrs[0] / lrs[1]
    return lrs[-1] * lrs[-1] / lrs[-2]


def cell_overrides(params, cell, *, layout) -> dict:
    """What a cell of a budget method trains with besides its recipe: the class's lr and training samples."""
    m = params.methods[cell.method]
    if m.budget is None or params.tune is None:
        return {}
    swept = params.tune_dataset(cell.dataset)
    path = layout.tune_json(cell.model, swept, m.budget)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the learning rate of budget class {m.budget} has not been chosen; "
                          f"fix: run tune@{cell.model}-{swept}-{m.budget} first (dvc repro runs it)")
    doc = read_json(path)
    if cell.method not in (doc.get("lr_per_method") or {}):
        raise ConfigError(f"{path} chose no learning rate for {cell.method} (it tuned {', '.join(doc.get('methods', []))}"
                          f"); fix: rerun tune@{cell.model}-{swept}-{m.budget}")
    return {"lr": float(doc["lr_per_method"][cell.method]), "max_steps": int(doc["steps"]),
            "limit_samples": params.tuned_samples(cell.dataset)}

"""One learning rate per budget class, chosen on a validation split carved from the training data.

Placements are compared within budget classes (a profile's `tune.budgets`: e.g. one module at rank r,
broad placements, full updates of one module). For each model x dataset x class:

- sweep (`pipeline.stages.sweep.sweep_stage`): every method of the class is trained at every candidate
  learning rate of the class, at the tuning seed, on the training split minus its last `tune.val_samples`
  samples; the held-out NLL of those last samples (the validation split: never the evaluation split, never trained
  on) is written per run;
- tune (`tune_stage`): the class's learning rate is the candidate with the lowest validation NLL averaged
  over the class's methods (a diverged run counts as infinite), so no method's own optimum decides it;
- every training run of the class's methods (all seeds) then uses that learning rate and the same
  training samples (`cell_overrides`); with `tune.reuse_from`, one dataset's sweep sets the rates of
  all datasets (every dataset still keeps its validation split out of training).

Run as: python -m stages.sweep --run smol-arith-dom-lr0 ; python -m stages.tune --budget smol-arith-module
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.io import read_json, write_json
from domlora.pipeline.params import split_id

logger = logging.getLogger(__name__)

RULE = "lowest validation NLL averaged over the class's methods (tuning seed; a diverged run counts as infinite)"


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
    return cfg.replace(lr=float(lr), limit_samples=params.tuned_samples(dataset), save_every=0)


def tune_stage(params, model: str, dataset: str, budget: str, *, layout) -> dict:
    """tune: placements/<model>/<dataset>/tuning/<budget>.json, the class's learning rate and the evidence."""
    if params.tune is None or budget not in params.tune.budgets:
        raise ConfigError(f"budget class {budget!r} is not declared in the profile's `tune.budgets`")
    lrs = [float(x) for x in params.tune.budgets[budget].lrs]
    methods = [x for x in params.budget_methods(budget) if params.methods[x].runs_on(model)]
    table: dict[str, dict[str, float | None]] = {}
    missing = []
    for method in methods:
        table[method] = {}
        for i, lr in enumerate(lrs):
            path = layout.sweep_json(model, dataset, budget, method, i)
            if not path.is_file():
                missing.append(Sweep(model, dataset, method, i).id)
                continue
            doc = read_json(path)
            if float(doc.get("lr", -1)) != lr:
                raise ConfigError(f"{path} was swept at lr {doc.get('lr')}, the class now lists {lr}; fix: rerun "
                                  f"sweep@{Sweep(model, dataset, method, i).id}")
            table[method][repr(lr)] = doc.get("val_nll")
    if missing:
        raise ConfigError(f"budget class {budget} on {model}/{dataset} lacks sweep runs {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}; fix: run them first (dvc repro runs them)")
    mean = {}
    for lr in lrs:
        vals = [table[x][repr(lr)] for x in methods]
        mean[repr(lr)] = math.inf if any(v is None or not math.isfinite(v) for v in vals) else sum(vals) / len(vals)
    best = min(lrs, key=lambda lr: (mean[repr(lr)], lr))
    if not math.isfinite(mean[repr(best)]):
        raise ConfigError(f"every learning rate of budget class {budget} diverged for some method on "
                          f"{model}/{dataset}; fix: add smaller rates to tune.budgets.{budget}.lrs")
    per_method = {x: float(min((lr for lr in lrs if table[x][repr(lr)] is not None),
                               key=lambda lr: table[x][repr(lr)], default=math.nan)) for x in methods}
    edge = best in (min(lrs), max(lrs))
    doc = {"model": model, "dataset": dataset, "budget": budget, "lr": best, "lrs": lrs, "methods": methods,
           "rule": RULE, "seed": params.tune.seed, "val_samples": params.tune.val_samples,
           "train_samples": params.tuned_samples(dataset), "val_nll": table,
           "mean_val_nll": {k: (None if not math.isfinite(v) else v) for k, v in mean.items()},
           "best_lr_per_method": per_method, "at_edge_of_grid": edge}
    if edge:
        logger.warning("budget class %s on %s/%s chose lr %g, at the edge of its grid %s", budget, model, dataset,
                       best, lrs)
    write_json(layout.tune_json(model, dataset, budget), doc)
    return doc


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
    return {"lr": float(doc["lr"]), "limit_samples": params.tuned_samples(cell.dataset)}

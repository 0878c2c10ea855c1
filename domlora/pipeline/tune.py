"""Each method at its own best learning rate, chosen on a validation split carved from the training data.

Placements are compared within tiers of (nearly) equal trainable parameters (a profile's `tune.budgets`:
e.g. one module at rank 64, 1.5% or 16% of vanilla LoRA, full LoRA). For each model x dataset x tier:

- sweep (`sweep_stage`): every method of the tier is trained at every rate of the tier's log grid, at the
  tuning seed, for the tier's first candidate step count, on the training split minus its last
  `tune.val_samples` samples; the held-out NLL of those last samples (the validation split: never the
  evaluation split, never trained on) is written per run;
- tune (`tune_stage`): each method's rate is the one with its lowest validation NLL (a diverged run counts
  as infinite; a tie goes to the smaller rate). A rate at an edge of the grid is not trusted: the stage
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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from domlora.errors import ConfigError
from domlora.io import read_json, write_json

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
        parts = run_id.split("-")
        if len(parts) != 4 or not parts[3].startswith("lr") or not parts[3][2:].isdigit():
            raise ConfigError(f"sweep id {run_id!r} must be MODEL-DATASET-METHOD-lrN")
        return cls(parts[0], parts[1], parts[2], int(parts[3][2:]))


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


def validation_samples(params, train_path: str | Path, dataset: str) -> list[dict]:
    """The validation split: the last `tune.val_samples` samples of the training split."""
    from domlora.samples import read_samples

    rows = read_samples(train_path)
    n_train = params.tuned_samples(dataset)
    if len(rows) != params.datasets[dataset].n_train:
        raise ConfigError(f"{train_path} holds {len(rows)} samples, the profile says n_train = "
                          f"{params.datasets[dataset].n_train}; fix: rerun prepare_data")
    return rows[n_train:]


def sweep_stage(params, run_id: str, *, layout, show_progress: bool = False) -> dict:
    """sweep: placements/<model>/<dataset>/tuning/<budget>/<method>-lr<i>.json (validation NLL + loss curve)."""
    s = Sweep.parse(run_id)
    check_sweep(params, s)
    m = params.methods[s.method]
    lr = params.tune.budgets[m.budget].lrs[s.index]
    out = layout.sweep_json(s.model, s.dataset, m.budget, s.method, s.index)
    doc = {"sweep": s.id} | tuning_run(params, s.model, s.dataset, s.method, lr, layout=layout,
                                       show_progress=show_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, doc)
    return doc


def tuning_run(params, model: str, dataset: str, method: str, lr: float, *, layout, steps: int | None = None,
               show_progress: bool = False) -> dict:
    """Train a method at `lr` on the tuning seed and the carved training split; score the validation split."""
    from domlora.adapters.variants import load_for_eval
    from domlora.evaluate.nll import heldout_nll
    from domlora.train import TrainingDiverged, train

    m = params.methods[method]
    spec = params.models[model]
    cfg = sweep_config(params, method, dataset, lr)
    if steps is not None:
        cfg = cfg.replace(max_steps=int(steps))
    data = layout.split(dataset, "train")
    val = validation_samples(params, data, dataset)
    doc = {"model": model, "dataset": dataset, "method": method, "budget": m.budget, "lr": float(lr),
           "seed": cfg.seed, "max_steps": cfg.max_steps, "train_samples": cfg.limit_samples, "val_samples": len(val)}
    batch = params.eval.batch_size if isinstance(params.eval.batch_size, int) else 8
    with tempfile.TemporaryDirectory(prefix=f"domlora-sweep-{model}-{method}-") as tmp:
        try:
            rec = train(model=spec, train_data=data, placement=layout.placement(model, dataset, method),
                        out_dir=tmp, cfg=cfg, show_progress=show_progress)
        except TrainingDiverged as exc:
            logger.warning("tuning run %s/%s/%s at lr %g diverged: %s", model, dataset, method, lr, exc)
            rec = read_json(Path(tmp) / "train_metrics.json")
            doc |= {"status": "diverged", "error": str(exc), "val_nll": None}
        else:
            loaded = load_for_eval(spec, Path(tmp) / "adapter")
            nll = heldout_nll(loaded.model, loaded.tokenizer, val, batch_size=batch)
            doc |= {"status": "success", "val_nll": nll["nll"], "val": nll}
        doc |= {"loss": rec.get("loss", []), "steps": rec.get("steps"), "trainable_params": rec.get("trainable_params"),
                "train_time_s": rec.get("train_time_s"), "wall_time_s": rec.get("wall_time_s")}
    return doc


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


def tune_stage(params, model: str, dataset: str, budget: str, *, layout, show_progress: bool = False) -> dict:
    """tune: placements/<model>/<dataset>/tuning/<budget>.json: each method's rate, the tier's steps, the evidence.

    Raises:
        ConfigError: missing or stale sweep runs; a method whose best rate is still at an edge of its grid after
            the tier's `extend` extensions; every rate diverging; a tier whose parameters differ by > 15%.
    """
    from domlora.pipeline.tiers import check_counts

    if params.tune is None or budget not in params.tune.budgets:
        raise ConfigError(f"budget class {budget!r} is not declared in the profile's `tune.budgets`")
    tier = params.tune.budgets[budget]
    lrs = [float(x) for x in tier.lrs]
    methods = [x for x in params.budget_methods(budget) if params.methods[x].runs_on(model)]
    runs: dict[str, dict[float, dict]] = {}
    missing = []
    for method in methods:
        runs[method] = {}
        for i, lr in enumerate(lrs):
            path = layout.sweep_json(model, dataset, budget, method, i)
            if not path.is_file():
                missing.append(Sweep(model, dataset, method, i).id)
                continue
            doc = read_json(path)
            if float(doc.get("lr", -1)) != lr:
                raise ConfigError(f"{path} was swept at lr {doc.get('lr')}, the class now lists {lr}; fix: rerun "
                                  f"sweep@{Sweep(model, dataset, method, i).id}")
            runs[method][lr] = doc
    if missing:
        raise ConfigError(f"budget class {budget} on {model}/{dataset} lacks sweep runs {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}; fix: run them first (dvc repro runs them)")
    counts = {x: int(d["trainable_params"]) for x in methods for d in list(runs[x].values())[:1]
              if d.get("trainable_params")}
    if tier.reference is not None:
        check_counts(budget, counts, model=model)
    # 1) each method's own rate, interior to its grid (extended one step at a time past an edge)
    chosen, extended, at_edge = {}, {}, []
    for method in methods:
        extended[method] = []
        while True:
            nll = {lr: d.get("val_nll") for lr, d in runs[method].items()}
            best = choose_rate(nll)
            if all(v is None or not math.isfinite(v) for v in nll.values()):
                best = min(nll)  # every rate diverged: look below the grid
            nxt = extend_grid(list(nll), best)
            if nxt is None:
                break
            if len(extended[method]) >= tier.extend:
                if tier.on_edge == "keep":
                    logger.warning("tier %s on %s/%s: %s keeps lr %g at the edge of its grid (on_edge: keep)", budget,
                                   model, dataset, method, best)
                    at_edge.append(method)
                    break
                raise ConfigError(f"method {method!r} of tier {budget} on {model}/{dataset} is best at lr {best:g}, at "
                                  f"the edge of its grid {sorted(nll)} after {tier.extend} extension(s); fix: widen "
                                  f"tune.budgets.{budget}.lrs past {best:g} (e.g. add {nxt:.3g}), or raise its "
                                  "`extend`")
            logger.warning("tier %s on %s/%s: %s is best at lr %g, the edge of its grid; extending to %g", budget,
                           model, dataset, method, best, nxt)
            runs[method][nxt] = tuning_run(params, model, dataset, method, nxt, layout=layout,
                                           show_progress=show_progress)
            extended[method].append(nxt)
        chosen[method] = best
    # 2) the tier's training length: the first candidate at which every chosen run has flattened
    candidates = list(tier.steps or [sweep_config(params, methods[0], dataset, lrs[0]).max_steps])
    longer: dict[str, dict[int, dict]] = {x: {candidates[0]: runs[x][chosen[x]]} for x in methods}
    steps, flat = candidates[0], {}
    for n in candidates:
        for method in methods:
            if n not in longer[method] and not flat.get(method):
                longer[method][n] = tuning_run(params, model, dataset, method, chosen[method], layout=layout, steps=n,
                                               show_progress=show_progress)
            if n in longer[method]:
                flat[method] = is_flat(longer[method][n].get("loss") or [])
        steps = n
        if all(flat.values()):
            break
    if not all(flat.values()):
        logger.warning("tier %s on %s/%s: %s had not flattened at the longest candidate, %d steps; the report marks "
                       "them", budget, model, dataset, ", ".join(x for x, f in flat.items() if not f), steps)
    table = {x: {repr(lr): d.get("val_nll") for lr, d in sorted(runs[x].items())} for x in methods}
    doc = {"model": model, "dataset": dataset, "budget": budget, "lrs": lrs, "methods": methods, "rule": RULE,
           "seed": params.tune.seed, "val_samples": params.tune.val_samples,
           "train_samples": params.tuned_samples(dataset), "val_nll": table,
           "lr_per_method": chosen, "extended": extended, "at_edge": at_edge, "trainable_params": counts,
           "steps": steps, "step_candidates": candidates, "flat": flat,
           "flat_share": {x: {str(n): flat_share(d.get("loss") or []) for n, d in longer[x].items()} for x in methods},
           "val_nll_at_steps": {x: {str(n): d.get("val_nll") for n, d in longer[x].items()} for x in methods}}
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
    if cell.method not in (doc.get("lr_per_method") or {}):
        raise ConfigError(f"{path} chose no learning rate for {cell.method} (it tuned {', '.join(doc.get('methods', []))}"
                          f"); fix: rerun tune@{cell.model}-{swept}-{m.budget}")
    return {"lr": float(doc["lr_per_method"][cell.method]), "max_steps": int(doc["steps"]),
            "limit_samples": params.tuned_samples(cell.dataset)}

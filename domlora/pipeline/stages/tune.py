"""tune stage: each method of a tier at its own rate (interior to its grid, extended past an edge by further
tuning runs) and the tier's step count (the first candidate at which every chosen run has flattened)."""
from __future__ import annotations

import logging
import math

from domlora.errors import ConfigError
from domlora.io import read_json, write_json
from domlora.pipeline.stages.sweep import tuning_run
from domlora.pipeline.tiers import check_counts
from domlora.pipeline.tune import RULE, Sweep, choose_rate, extend_grid, flat_share, is_flat, sweep_config

logger = logging.getLogger(__name__)


def tune_stage(params, model: str, dataset: str, budget: str, *, layout, show_progress: bool = False) -> dict:
    """tune: placements/<model>/<dataset>/tuning/<budget>.json: each method's rate, the tier's steps, the evidence.

    Raises:
        ConfigError: missing or stale sweep runs; a method whose best rate is still at an edge of its grid after
            the tier's `extend` extensions; every rate diverging; a tier whose parameters differ by > 15%.
    """
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

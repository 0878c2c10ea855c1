"""The placement comparison: which placement wins, at equal budget, each method at its own rate, over seeds.

`reports/placement.md`: per model x dataset, one table per tier (budget class) of (nearly) equal trainable
parameters: method, parameters, learning rate and steps (what its tuning chose), exact match and held-out answer
NLL as mean ± standard error over seeds, and the paired difference to the tier's best (per seed, then mean ±
standard error), whether the training loss had flattened; then a verdict per tier written from those numbers,
and the learning-rate sweep behind each rate. One Pareto figure per model x dataset,
`reports/figures/placement_<model>_<dataset>.png`: each score against trainable parameters (log scale), one
colour per tier. Reads what the stages wrote; a missing cell is a `–`, never a crash. Written by the report
stage for every profile (without tiers the tier and sweep columns stay empty).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from domlora.evaluate.tasks import NLL_TASKS
from domlora.io import read_json_or_none, save_figure, write_text
from domlora.pipeline.params import Cell, Params
from domlora.pipeline.paths import Layout
from domlora.pipeline.report import fmt_params
from domlora.pipeline.tune import FLAT_SHARE, flat_share

MISSING = "–"
NOISE_SE = 2.0
"""a paired difference exceeds the seeds' noise when it is more than this many standard errors from zero"""
STRATEGY_PROBE = {"dom": "page", "page_argmax": "page", "page_topk": "page", "page_budget": "page", "page_rank": "page",
                  "plop": "nfn", "plop_inverse": "nfn"}
PAGE_STRATEGIES = ("dom", "page_argmax", "page_topk", "page_budget", "page_rank")


def mean_se(values: list[float]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    if len(vals) == 1:
        return vals[0], None, 1
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals)), len(vals)


def describe_modules(names: list[str], table: dict[str, dict]) -> str:
    """`model.layers.11.mlp.down_proj` for one module; `N: type x count over layers a-b` for many."""
    if not names:
        return MISSING
    if len(names) <= 2:
        return ", ".join(f"`{n}`" for n in names)
    types: dict[str, int] = {}
    layers = set()
    for n in names:
        m = table.get(n, {})
        types[m.get("type", n.rsplit(".", 1)[-1])] = types.get(m.get("type", n.rsplit(".", 1)[-1]), 0) + 1
        if "layer" in m:
            layers.add(m["layer"])
    span = f" in {len(layers)} layers ({min(layers)}-{max(layers)})" if layers else ""
    return f"{len(names)}: " + ", ".join(f"{t} x{c}" for t, c in types.items()) + span


def _task_metrics(params: Params, dataset: str) -> tuple[str | None, str | None]:
    """The exact-match key and the NLL key of a dataset's tasks in scores.json."""
    em = nll = None
    for t in params.datasets[dataset].tasks:
        if t in NLL_TASKS:
            nll = nll or f"{t}/nll"
        elif em is None:
            em = f"{t}/exact_match"
    return em, nll


def probe_cost(params: Params, layout: Layout, model: str, dataset: str, method: str, placement: dict | None) -> dict:
    """What choosing a method's placement cost: a peer's measured cost, the PAGE / NFN probe's time, or nothing."""
    m = params.methods[method]
    if placement and placement.get("cost"):
        c = placement["cost"]
        return {"what": m.placement, "wall_s": c.get("wall_s"), "peak_mb": c.get("peak_over_model_mb")}
    kind = STRATEGY_PROBE.get(m.placement)
    if kind:
        doc = read_json_or_none(layout.probe_json(model, params.select_probe(dataset), kind)) or {}
        return {"what": "PAGE probe" if kind == "page" else "NFN probe", "wall_s": doc.get("seconds"), "peak_mb": None}
    if m.train.get("layer_sampling") == "ist":
        return {"what": "during training (IST importance rollouts)", "wall_s": None, "peak_mb": None}
    return {"what": "none", "wall_s": 0.0, "peak_mb": 0.0}


def collect(params: Params, layout: Layout) -> list[dict]:
    """One row per model x dataset x method, aggregated over seeds."""
    rows = []
    for model in params.grid.models:
        for dataset in params.grid.datasets:
            em_key, nll_key = _task_metrics(params, dataset)
            for method in params.grid.methods:
                m = params.methods[method]
                if not m.runs_on(model):
                    continue
                cells = [Cell(model, dataset, method, s) for s in params.method_seeds(method)]  # a class may run fewer
                placement = read_json_or_none(layout.placement(model, dataset, method))
                tune = read_json_or_none(layout.tune_json(model, params.tune_dataset(dataset), m.budget)) \
                    if m.budget and params.tune else None
                ems, nlls, params_n, ratios, lrs, done = [], [], [], [], [], 0
                steps = []
                for c in cells:
                    rec = read_json_or_none(layout.train_metrics(c)) or {}
                    scores = read_json_or_none(layout.scores_json(c)) or {}
                    if rec.get("status") == "success":
                        params_n.append(rec.get("trainable_params"))
                        ratios.append(flat_share(rec.get("loss") or []))
                        lrs.append((rec.get("config") or {}).get("lr"))
                        steps.append(rec.get("steps"))
                    if em_key in scores or nll_key in scores:
                        done += 1
                    ems.append(100 * scores[em_key] if em_key in scores else None)
                    nlls.append(scores.get(nll_key) if nll_key else None)
                table = (placement or {}).get("modules") and _module_table(params, layout, model, dataset)
                em = mean_se(ems)
                nll = mean_se(nlls)
                flats = [r for r in ratios if r is not None]
                rows.append({
                    "model": model, "dataset": dataset, "method": method, "label": m.label or method,
                    "budget": m.budget, "strategy": m.placement,
                    "lr": _tuned_lr(tune, method) if tune else (lrs[0] if lrs else None),
                    "steps": tune.get("steps") if tune and tune.get("steps") else (steps[0] if steps else None),
                    "trainable_params": params_n[0] if params_n else (placement or {}).get("trainable_params"),
                    "em_by_seed": {c.seed: v for c, v in zip(cells, ems) if v is not None},
                    "nll_by_seed": {c.seed: v for c, v in zip(cells, nlls) if v is not None},
                    "cost": probe_cost(params, layout, model, dataset, method, placement),
                    "modules": list((placement or {}).get("modules") or []),
                    "modules_text": describe_modules(list((placement or {}).get("modules") or []), table or {}),
                    "em": em[0], "em_se": em[1], "nll": nll[0], "nll_se": nll[1], "seeds": em[2] or nll[2],
                    "cells": len(cells), "cells_done": done,
                    "flat_share_max": max(flats) if flats else None,
                    "flattened": all(r <= FLAT_SHARE for r in flats) if flats else None,
                })
    return rows


def _tuned_lr(tune: dict, method: str) -> float | None:
    """A method's rate from its tier's tune file (its own; an older file's one rate for the class)."""
    per = tune.get("lr_per_method")
    return per.get(method) if isinstance(per, dict) else tune.get("lr")


def paired_difference(a: dict, b: dict) -> tuple[float | None, float | None, int]:
    """Mean ± standard error over the seeds both rows finished of a[seed] - b[seed]."""
    common = sorted(set(a) & set(b))
    return mean_se([a[s] - b[s] for s in common]) if common else (None, None, 0)


def tier_rows(rows: list[dict]) -> dict[str | None, list[dict]]:
    """A model x dataset's rows grouped by tier, in the order the tiers first appear."""
    out: dict[str | None, list[dict]] = {}
    for r in rows:
        out.setdefault(r["budget"], []).append(r)
    return out


def compare(rows: list[dict]) -> list[dict]:
    """Each row of a tier with its paired difference to the tier's best EM row and to its best NLL row."""
    em_rows = [r for r in rows if r["em"] is not None]
    nll_rows = [r for r in rows if r["nll"] is not None]
    best_em = max(em_rows, key=lambda r: r["em"]) if em_rows else None
    best_nll = min(nll_rows, key=lambda r: r["nll"]) if nll_rows else None
    out = []
    for r in rows:
        d_em = paired_difference(r["em_by_seed"], best_em["em_by_seed"]) if best_em and r is not best_em else None
        d_nll = paired_difference(r["nll_by_seed"], best_nll["nll_by_seed"]) if best_nll and r is not best_nll \
            else None
        out.append(r | {"best_em": r is best_em, "best_nll": r is best_nll, "d_em": d_em, "d_nll": d_nll})
    return out


def _beyond_noise(d: tuple | None) -> bool | None:
    if not d or d[0] is None or d[1] is None:
        return None
    return abs(d[0]) > NOISE_SE * d[1]


def verdict(tier: str | None, rows: list[dict], *, label: str | None = None) -> str:
    """A paragraph saying who wins the tier, by how much, and whether that exceeds the seeds' noise."""
    cmp_ = compare(rows)
    done = [r for r in cmp_ if r["em"] is not None]
    name = f"Tier `{tier}`" + (f" ({label})" if label else "") if tier else "Methods without a tier"
    if len(done) < 2:
        return f"{name}: fewer than two methods have scores yet; no verdict."
    ranked = sorted(done, key=lambda r: -r["em"])
    best, second = ranked[0], ranked[1]
    d = second["d_em"]
    parts = [f"{name}: by exact match **{best['label']}** leads with {_fmt(best['em'], best['em_se'])}%"]
    if d and d[0] is not None:
        noise = _beyond_noise(d)
        diff = f"{-d[0]:.1f}" + (f" ± {d[1]:.1f}" if d[1] is not None else "")
        parts.append(f"ahead of {second['label']} by {diff} points (paired over {d[2]} seed(s)), "
                     + ("more than the seeds' noise" if noise else "within the seeds' noise" if noise is False
                        else "with too few seeds to judge the noise"))
    clear = [r["label"] for r in ranked[1:] if _beyond_noise(r["d_em"])]
    if clear:
        parts.append(f"it beats {', '.join(clear)} beyond the noise (more than {NOISE_SE:g} standard errors)")
    nll_done = [r for r in cmp_ if r["nll"] is not None]
    if nll_done:
        bn = min(nll_done, key=lambda r: r["nll"])
        tied = [r["label"] for r in nll_done if r is not bn and _beyond_noise(r["d_nll"]) is False]
        parts.append(f"by held-out NLL {bn['label']} is lowest ({_fmt(bn['nll'], bn['nll_se'], digits=4)})"
                     + (f", not separable from {', '.join(tied)}" if tied else ""))
    page = [r for r in ranked if r["strategy"] in PAGE_STRATEGIES]
    if page:
        parts.append("PAGE's " + ", ".join(f"{r['label']} ranks {ranked.index(r) + 1} of {len(ranked)}" for r in page)
                     + " by exact match")
    lora = [r for r in ranked if r["strategy"] == "all" and r["budget"] == tier and r not in page]
    for r in lora:
        for pr in page:
            dd = paired_difference(pr["em_by_seed"], r["em_by_seed"])
            if dd[0] is not None:
                # only a tier guarantees (nearly) equal counts; without one, the counts are said
                at = ("at the same parameter count" if tier is not None else
                      f"({fmt_params(pr.get('trainable_params'))} against {fmt_params(r.get('trainable_params'))} "
                      "trainable parameters)")
                parts.append(f"{pr['label']} minus {r['label']} {at}: "
                             f"{dd[0]:+.1f}" + (f" ± {dd[1]:.1f}" if dd[1] is not None else "") + " points")
    return "; ".join(parts) + "."


def _module_table(params: Params, layout: Layout, model: str, dataset: str) -> dict:
    doc = read_json_or_none(layout.page_json(model, params.select_probe(dataset))) or {}
    return doc.get("modules") or {}


def _base_scores(params: Params, layout: Layout, model: str, dataset: str) -> tuple[float | None, float | None]:
    em_key, nll_key = _task_metrics(params, dataset)
    s = read_json_or_none(layout.scores_json(layout.base_id(model, dataset))) or {}
    return (100 * s[em_key] if em_key in s else None), (s.get(nll_key) if nll_key else None)


def _fmt(v, se=None, digits=1) -> str:
    if v is None:
        return MISSING
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _fmt_cost(c: dict) -> str:
    if c["what"] == "none":
        return "none"
    if c["wall_s"] is None:
        return c["what"]
    mem = f", +{c['peak_mb']:.0f} MB" if c.get("peak_mb") is not None else ""
    return f"{c['what']}: {c['wall_s']:.1f} s{mem}"


def sweep_lines(params: Params, layout: Layout, model: str, dataset: str) -> list[str]:
    """The learning-rate sweep behind each method's rate: validation NLL per method and rate, per tier."""
    if params.tune is None:
        return []
    if params.tune_dataset(dataset) != dataset:
        return [f"The learning rates and step counts are those the tuning on `{params.tune_dataset(dataset)}` chose "
                "(`tune.reuse_from`); see its section.", ""]
    out = []
    for b, spec in params.tune.budgets.items():
        doc = read_json_or_none(layout.tune_json(model, dataset, b))
        if not doc:
            out += [f"- tier `{b}`: not tuned yet", ""]
            continue
        per = doc.get("lr_per_method") or {x: doc.get("lr") for x in doc["methods"]}
        lrs = sorted({float(lr) for x in doc["methods"] for lr in doc["val_nll"][x]} | set(map(float, doc["lrs"])))
        extended = {x: v for x, v in (doc.get("extended") or {}).items() if v}
        steps = doc.get("steps")
        head = f"Tier `{b}` ({spec.label or b}): {doc['rule']}; {doc['val_samples']} validation samples carved " \
               f"from the end of the training split, {doc['train_samples']} trained on"
        if steps:
            head += f"; {steps} steps (candidates {doc.get('step_candidates')}: the first at which every method's " \
                    "tuning run had flattened" + ("" if all((doc.get("flat") or {}).values()) else
                                                   ", **not reached by every method**") + ")"
        if doc.get("at_edge"):
            head += "; **still at the edge of its grid (kept, `on_edge: keep`)**: " + ", ".join(
                params.methods[x].label or x for x in doc["at_edge"])
        if extended:
            head += "; grid extended for " + ", ".join(f"{params.methods[x].label or x} ({', '.join(f'{v:g}' for v in vs)})"
                                                        for x, vs in extended.items())
        out += [head, "", "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
                "|---|" + "---:|" * (len(lrs) + 1)]
        for meth in doc["methods"]:
            vals = [doc["val_nll"][meth].get(repr(lr)) for lr in lrs]
            out.append(f"| {params.methods[meth].label or meth} | " + " | ".join(
                MISSING if v is None else (f"**{v:.4f}**" if lr == per.get(meth) else f"{v:.4f}")
                for lr, v in zip(lrs, vals)) + f" | {MISSING if per.get(meth) is None else format(per[meth], 'g')} |")
        out.append("")
    return out


def figure(rows: list[dict], path: Path, *, title: str, base: tuple[float | None, float | None]) -> Path | None:
    """Pareto figure: exact match and held-out NLL against trainable parameters (log x), one colour per tier, the
    front of methods no other method beats with fewer parameters drawn as a step line."""
    pts = [r for r in rows if r["trainable_params"] and (r["em"] is not None or r["nll"] is not None)]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(dict.fromkeys(r["budget"] or "–" for r in pts))
    colors = {c: f"C{i}" for i, c in enumerate(tiers)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, name, ref, better in ((axes[0], "em", "exact match (%)", base[0], max),
                                       (axes[1], "nll", "held-out answer NLL (nats/token)", base[1], min)):
        for c in tiers:
            sel = [r for r in pts if (r["budget"] or "–") == c and r[key] is not None]
            if not sel:
                continue
            xs = [r["trainable_params"] for r in sel]
            ax.axvspan(min(xs) / 1.08, max(xs) * 1.08, color=colors[c], alpha=0.08)  # the tier's parameter band
            ax.errorbar(xs, [r[key] for r in sel], yerr=[r[f"{key}_se"] or 0.0 for r in sel], fmt="o", capsize=3,
                        color=colors[c], label=f"tier {c}")
            for r in sel:
                ax.annotate(r["label"], (r["trainable_params"], r[key]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
        front, best = [], None
        for r in sorted((r for r in pts if r[key] is not None), key=lambda r: r["trainable_params"]):
            if best is None or better(r[key], best) == r[key] and r[key] != best:
                front.append(r)
                best = r[key]
        if len(front) > 1:
            ax.step([r["trainable_params"] for r in front], [r[key] for r in front], where="post", color="black",
                    lw=1, alpha=0.6, label="Pareto front")
        if ref is not None:
            ax.axhline(ref, color="grey", ls="--", lw=1, label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].invert_yaxis()  # better is up in both panels
    fig.suptitle(title + " (error bars: standard error over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt_diff(d: tuple | None, digits: int) -> str:
    if d is None:
        return "best"
    if d[0] is None:
        return MISSING
    return f"{d[0]:+.{digits}f}" + (f" ± {d[1]:.{digits}f}" if d[1] is not None else "")


def tier_table(rows: list[dict]) -> list[str]:
    """One tier's table: parameters, rate, steps, scores and the paired differences to the tier's best."""
    out = ["| method | trainable | lr | steps | probe cost | modules | EM (%) | Δ EM vs best | NLL | Δ NLL vs best "
           "| seeds | flat |", "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in compare(rows):
        flat = MISSING if r["flattened"] is None else f"{'yes' if r['flattened'] else 'no'} ({r['flat_share_max']:.2f})"
        out.append(f"| {r['label']} | {fmt_params(r['trainable_params'])} "
                   f"| {MISSING if r['lr'] is None else format(r['lr'], 'g')} | {r.get('steps') or MISSING} "
                   f"| {_fmt_cost(r['cost'])} | {r['modules_text']} | {_fmt(r['em'], r['em_se'])} "
                   f"| {_fmt_diff(r['d_em'], 1) if r['em'] is not None else MISSING} "
                   f"| {_fmt(r['nll'], r['nll_se'], digits=4)} "
                   f"| {_fmt_diff(r['d_nll'], 4) if r['nll'] is not None else MISSING} | {r['seeds']}/{r['cells']} "
                   f"| {flat} |")
    return out


def write_placement_report(params: Params, layout: Layout) -> dict:
    """Write reports/placement.md and its figures; returns the rows."""
    rows = collect(params, layout)
    out = layout.reports
    lines = ["# Which placement wins?", "",
             f"Profile `{params.profile}`. Methods are compared within a tier of (nearly) equal trainable parameters, "
             "each at the learning rate its own sweep chose on the validation split and for the tier's step count "
             "(both decided on the tuning seed from validation NLL and training loss, before any evaluation). Scores "
             "are the mean ± standard error over the seeds that finished (no ± with one seed). EM: exact match (%) on "
             "the held-out problems; NLL: teacher-forced negative log-likelihood of the reference answers, assistant "
             "tokens only (nats per token; lower is better). Δ vs best: the paired difference to the tier's best "
             "method in that metric, seed by seed, mean ± standard error; it exceeds the seeds' noise when it is more "
             f"than {NOISE_SE:g} standard errors from zero. Probe cost: what choosing the placement took. Flat: in every "
             f"seed the last quarter of training steps brought at most {100 * FLAT_SHARE:.0f}% of the run's loss "
             "improvement (the largest share in brackets). Protocol: [docs/placement.md](../docs/placement.md).", ""]
    figs = []
    for model in params.grid.models:
        for dataset in params.grid.datasets:
            sel = [r for r in rows if r["model"] == model and r["dataset"] == dataset]
            if not sel:
                continue
            base = _base_scores(params, layout, model, dataset)
            label = params.models[model].label or model
            lines += [f"## {label} · {params.datasets[dataset].label or dataset}", "",
                      f"Base model: EM {_fmt(base[0])}%, NLL {_fmt(base[1], digits=4)}.", ""]
            verdicts = []
            for tier, trows in tier_rows(sel).items():
                spec = params.tune.budgets.get(tier) if params.tune is not None and tier else None
                counts = [r["trainable_params"] for r in trows if r["trainable_params"]]
                size = f" — {fmt_params(min(counts))}" + (f" to {fmt_params(max(counts))}" if max(counts) != min(counts)
                                                          else "") + " trainable parameters" if counts else ""
                lines += [f"### Tier `{tier or MISSING}`" + (f": {spec.label}" if spec and spec.label else "") + size,
                          ""] + tier_table(trows) + [""]
                verdicts.append(verdict(tier, trows, label=spec.label if spec else None))
            f = figure(sel, out / "figures" / f"placement_{model}_{dataset}.png", base=base,
                       title=f"{label}, {params.datasets[dataset].label or dataset}")
            if f is not None:
                figs.append(f)
                lines += [f"![placement {model} {dataset}](figures/{f.name})", ""]
            lines += ["### Verdict per tier", ""] + [f"- {v}" for v in verdicts] + [""]
            sweep = sweep_lines(params, layout, model, dataset)
            if sweep:
                lines += ["### Learning rate per method", ""] + sweep
    write_text(out / "placement.md", "\n".join(lines) + "\n")
    return {"rows": rows, "figures": [str(f) for f in figs]}

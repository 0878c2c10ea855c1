"""The placement comparison: which placement wins, at equal budget, fairly tuned, over seeds.

`reports/placement.md`: per model x dataset, one row per method: its budget class and learning rate,
trainable parameters, what choosing the placement cost (the probe or peer: wall time, peak memory), the
chosen modules, exact match and held-out answer NLL as mean ± standard error over seeds, and whether the
training loss had flattened; then the learning-rate sweep behind each class. One figure per model x
dataset, `reports/figures/placement_<model>_<dataset>.png`: each score against trainable parameters (log
scale), one point per method with its standard error. Reads what the stages wrote; a missing cell is a
`–`, never a crash. Written by the report stage for every profile (without budget classes the class and
sweep columns stay empty).
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

MISSING = "–"
FLAT_SHARE = 0.1
"""a run's loss counts as flattened when its last quarter of steps brought at most this share of the whole
run's improvement: (mean of the third quarter - mean of the last) <= 0.1 x (mean of the first - mean of the last)"""
STRATEGY_PROBE = {"dom": "page", "page_argmax": "page", "page_topk": "page", "plop": "nfn", "plop_inverse": "nfn"}


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
                for c in cells:
                    rec = read_json_or_none(layout.train_metrics(c)) or {}
                    scores = read_json_or_none(layout.scores_json(c)) or {}
                    if rec.get("status") == "success":
                        params_n.append(rec.get("trainable_params"))
                        ratios.append(flat_share(rec.get("loss") or []))
                        lrs.append((rec.get("config") or {}).get("lr"))
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
                    "lr": tune["lr"] if tune else (lrs[0] if lrs else None),
                    "trainable_params": params_n[0] if params_n else None,
                    "cost": probe_cost(params, layout, model, dataset, method, placement),
                    "modules": list((placement or {}).get("modules") or []),
                    "modules_text": describe_modules(list((placement or {}).get("modules") or []), table or {}),
                    "em": em[0], "em_se": em[1], "nll": nll[0], "nll_se": nll[1], "seeds": em[2] or nll[2],
                    "cells": len(cells), "cells_done": done,
                    "flat_share_max": max(flats) if flats else None,
                    "flattened": all(r <= FLAT_SHARE for r in flats) if flats else None,
                })
    return rows


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
    """The learning-rate sweep behind each budget class: validation NLL per method and rate."""
    if params.tune is None:
        return []
    if params.tune_dataset(dataset) != dataset:
        return [f"The learning rates are those the sweep on `{params.tune_dataset(dataset)}` chose "
                "(`tune.reuse_from`); see its section.", ""]
    out = []
    for b, spec in params.tune.budgets.items():
        doc = read_json_or_none(layout.tune_json(model, dataset, b))
        if not doc:
            out += [f"- class `{b}`: not tuned yet", ""]
            continue
        lrs = doc["lrs"]
        out += [f"Class `{b}` ({spec.label or b}): lr **{doc['lr']:g}** ({doc['rule']}; {doc['val_samples']} "
                f"validation samples carved from the end of the training split, {doc['train_samples']} trained on)"
                + (" — at the edge of the grid" if doc.get("at_edge_of_grid") else ""), "",
                "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | its own best |",
                "|---|" + "---:|" * (len(lrs) + 1)]
        for meth in doc["methods"]:
            vals = [doc["val_nll"][meth].get(repr(float(lr))) for lr in lrs]
            out.append(f"| {params.methods[meth].label or meth} | " + " | ".join(
                MISSING if v is None else f"{v:.4f}" for v in vals) + f" | {doc['best_lr_per_method'][meth]:g} |")
        out.append("| **mean** | " + " | ".join(MISSING if doc["mean_val_nll"].get(repr(float(lr))) is None else
                                              f"**{doc['mean_val_nll'][repr(float(lr))]:.4f}**" for lr in lrs) + " | |")
        out.append("")
    return out


def figure(rows: list[dict], path: Path, *, title: str, base: tuple[float | None, float | None]) -> Path | None:
    """Exact match and held-out NLL against trainable parameters (log x), one point per method with its SE."""
    pts = [r for r in rows if r["trainable_params"] and (r["em"] is not None or r["nll"] is not None)]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(r["budget"] or "–" for r in pts))
    colors = {c: f"C{i}" for i, c in enumerate(classes)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, name, ref in ((axes[0], "em", "exact match (%)", base[0]),
                               (axes[1], "nll", "held-out answer NLL (nats/token)", base[1])):
        for c in classes:
            sel = [r for r in pts if (r["budget"] or "–") == c and r[key] is not None]
            if not sel:
                continue
            ax.errorbar([r["trainable_params"] for r in sel], [r[key] for r in sel],
                        yerr=[r[f"{key}_se"] or 0.0 for r in sel], fmt="o", capsize=3, color=colors[c],
                        label=f"class {c}")
            for r in sel:
                ax.annotate(r["label"], (r["trainable_params"], r[key]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
        if ref is not None:
            ax.axhline(ref, color="grey", ls="--", lw=1, label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].invert_yaxis()  # better is up in both panels
    fig.suptitle(title + " (error bars: standard error over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def write_placement_report(params: Params, layout: Layout) -> dict:
    """Write reports/placement.md and its figures; returns the rows."""
    rows = collect(params, layout)
    out = layout.reports
    lines = ["# Which placement wins?", "",
             f"Profile `{params.profile}`. One row per method; scores are the mean ± standard error over the seeds "
             "that finished (no ± with one seed). EM: exact match (%) on the held-out problems; NLL: teacher-forced "
             "negative log-likelihood of the reference answers, assistant tokens only (nats per token; lower is "
             "better). Probe cost: what choosing the placement took (the PAGE / NFN probe's time from its file, or "
             "the peer's wall time and peak memory above the loaded model, measured in the select stage). "
             f"Flat: in every seed the last quarter of training steps brought at most {100 * FLAT_SHARE:.0f}% of the "
             "run's loss improvement (quarter means of the training loss; the largest share in brackets). Protocol: "
             "[docs/placement.md](../docs/placement.md).", ""]
    figs = []
    for model in params.grid.models:
        for dataset in params.grid.datasets:
            sel = [r for r in rows if r["model"] == model and r["dataset"] == dataset]
            if not sel:
                continue
            base = _base_scores(params, layout, model, dataset)
            label = params.models[model].label or model
            lines += [f"## {label} · {params.datasets[dataset].label or dataset}", "",
                      "| method | class | lr | trainable | probe cost | modules | EM (%) | NLL | seeds | flat |",
                      "|---|---|---:|---:|---|---|---:|---:|---:|---|",
                      f"| base model | | | 0 | | | {_fmt(base[0])} | {_fmt(base[1], digits=4)} | | |"]
            for r in sel:
                flat = MISSING if r["flattened"] is None else \
                    f"{'yes' if r['flattened'] else 'no'} ({r['flat_share_max']:.2f})"
                lines.append(f"| {r['label']} | {r['budget'] or MISSING} | {MISSING if r['lr'] is None else format(r['lr'], 'g')} "
                             f"| {fmt_params(r['trainable_params'])} | {_fmt_cost(r['cost'])} | {r['modules_text']} "
                             f"| {_fmt(r['em'], r['em_se'])} | {_fmt(r['nll'], r['nll_se'], digits=4)} "
                             f"| {r['seeds']}/{r['cells']} | {flat} |")
            lines.append("")
            f = figure(sel, out / "figures" / f"placement_{model}_{dataset}.png", base=base,
                       title=f"{label}, {params.datasets[dataset].label or dataset}")
            if f is not None:
                figs.append(f)
                lines += [f"![placement {model} {dataset}](figures/{f.name})", ""]
            sweep = sweep_lines(params, layout, model, dataset)
            if sweep:
                lines += ["### Learning rate per budget class", ""] + sweep
    write_text(out / "placement.md", "\n".join(lines) + "\n")
    return {"rows": rows, "figures": [str(f) for f in figs]}

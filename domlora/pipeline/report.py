"""The report stage: Markdown tables in the layouts of the paper's tables, figures, a summary.

Reads what the other stages wrote (probes/, placements/, runs/) for the cells of the
active grid; a cell that is missing or failed is shown as such, never crashes the report.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from domlora.evaluate.multiple_choice import MC_TASKS
from domlora.evaluate.tasks import PAPER_COLUMNS, STAND_IN_WARNING, TABLE_COLUMNS, compare_with_paper, is_stand_in
from domlora.io import read_json_or_none, save_figure, write_json, write_text
from domlora.models import config_hash_of
from domlora.pipeline.params import Cell, Params
from domlora.pipeline.paths import Layout
from domlora.pipeline.registry import record
from domlora.pipeline.sparse_b_report import render_report_section
from domlora.pipeline.tracking import train_summary
from domlora.probes.agreement import compare_probes
from domlora.samples import CUT_WARN_SHARE

logger = logging.getLogger(__name__)

MISSING = "–"
PRIMARY_HINTS = ("exact_match", "pass@1", "pass_at_1", "acc_norm", "acc", "em", "score", "f1")
TABLE_TITLES = {
    1: "Table 1: placement methods, instruction tuning",
    2: "Table 2: placement methods, reasoning / code / chat",
    3: "Table 3: LoRA variants, broad vs dominant-module placement (instruction tuning)",
    4: "Table 4: LoRA variants, broad vs dominant-module placement (reasoning / code / chat)",
    5: "Table 5: layer and module ablations",
    10: "Table 10: training time and peak memory",
    11: "Table 11: LoRA rank sensitivity of DomLoRA",
    12: "Table 12: full-parameter updates, dominant module vs all modules",
}


def primary_metric(task: str, metrics: dict[str, float]) -> tuple[str, float] | None:
    """The headline number of a task in a flat `{"task/metric": value}` dict."""
    keys = [k for k in metrics if k.split("/")[0] == task and "stderr" not in k and isinstance(metrics[k], (int, float))]
    for hint in PRIMARY_HINTS:
        for k in keys:
            if hint in k.split("/", 1)[-1]:
                return k, float(metrics[k])
    return (keys[0], float(metrics[keys[0]])) if keys else None


def _stderr(eval_doc: dict | None, key: str) -> float | None:
    """The standard error eval.json holds for a flat `task/metric` key (None where lm-eval gave none)."""
    task, metric = key.split("/", 1)
    try:
        se = eval_doc["tasks"][task]["metrics"][metric]["stderr"]
    except (KeyError, TypeError):
        return None
    return float(se) if isinstance(se, (int, float)) and not math.isnan(se) else None


def _scale(task: str, value: float) -> float:
    # scores in [0, 1] print as percentages; MT-Bench (1-10) counts x10 in averages, as the paper does
    if "mt_bench" in task or "mtbench" in task:
        return value * 10
    return value * 100 if value <= 1.0 else value


def _tasks_of(metrics: dict) -> list[str]:
    return list(dict.fromkeys(k.split("/")[0] for k in metrics))


class Collected:
    """Everything the report reads, gathered once."""

    def __init__(self, params: Params, layout: Layout):
        self.params, self.layout = params, layout
        self.cells = params.cells()
        self.train = {c.id: read_json_or_none(layout.train_metrics(c)) for c in self.cells}
        self.metrics = {c.id: read_json_or_none(layout.scores_json(c)) for c in self.cells}
        self.evals = {c.id: read_json_or_none(layout.eval_json(c)) for c in self.cells}
        self.base = {(m, d): read_json_or_none(layout.scores_json(layout.base_id(m, d)))
                     for m in params.grid.models for d in params.grid.datasets}
        self.base_evals = {(m, d): read_json_or_none(layout.eval_json(layout.base_id(m, d)))
                           for m in params.grid.models for d in params.grid.datasets}
        self.placements = {c.id: read_json_or_none(layout.placement(c.model, c.dataset, c.method)) for c in self.cells}
        self.probes = {(m, d): read_json_or_none(layout.page_json(m, d))
                       for m in params.grid.probe_models for d in params.grid.probe_datasets}
        self.massive = {(m, d): read_json_or_none(layout.massive_json(m, d))
                        for m in params.grid.probe_models for d in params.grid.probe_datasets}

    def status(self, cell: Cell) -> str:
        tm = self.train.get(cell.id)
        if tm is None:
            return "missing"
        if tm.get("status") not in (None, "success"):
            return f"failed: {str(tm.get('error', tm.get('status')))[:80]}"
        if self.metrics.get(cell.id) is None:
            return "not evaluated"
        return "ok"


def _fmt(v: float | None, digits: int = 2) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f}%"


def fmt_params(n: int | None) -> str:
    """A parameter count as `19.54M` or `135.2k` (both reports)."""
    if n is None:
        return MISSING
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _table_datasets(params: Params, table: int) -> list[str]:
    instruct = [d for d in params.grid.datasets if "instruct" in params.datasets[d].tasks]
    if table in (1, 3):
        return instruct or list(params.grid.datasets)
    if table in (2, 4):
        return [d for d in params.grid.datasets if d not in instruct] if instruct else []
    return list(params.grid.datasets)


def _paper_cols(col: Collected, model: str, datasets: list[str], table: int) -> list[tuple[str, str, str | None, str]]:
    """(dataset, task, metric, header) for each of a paper table's own columns that this grid evaluates.

    Each column comes from the dataset whose evaluation suite is the column's home in the paper (GSM8K from
    the instruction-tuning suite in Tables 1 and 3, from the math suite elsewhere); the task is the first of
    `evaluate.tasks.PAPER_COLUMNS` that ran (the paper's protocol, else its log-likelihood alternative).
    """
    p = col.params
    out = []
    for column in TABLE_COLUMNS.get(table, []):
        suite = column_suite(column, table)
        for d in (d for d in datasets if suite in p.datasets[d].tasks):
            present = set(_tasks_of(col.base.get((model, d)) or {}))
            for c in (c for c in col.cells if c.model == model and c.dataset == d):
                present |= set(_tasks_of(col.metrics.get(c.id) or {}))
            hit = next(((t, m) for t, m in PAPER_COLUMNS[column] if t in present), None)
            if hit:
                out.append((d, hit[0], hit[1], column))
                break
    return out


def column_suite(column: str, table: int) -> str:
    """The evaluation suite a paper column is read from in `table`."""
    if column == "GSM8K":
        return "instruct" if table in (1, 3) else "math"
    return {"MATH": "math", "HumanEval": "code", "HumanEval+": "code", "MT-Bench": "chat"}.get(column, "instruct")


def _all_cols(col: Collected, model: str, datasets: list[str]) -> list[tuple[str, str, str | None, str]]:
    """Every task of every dataset in the table, as evaluated (grids without the paper's suites)."""
    cols: list[tuple[str, str, str | None, str]] = []
    for d in datasets:
        seen: set[str] = set()
        sources = [col.metrics.get(c.id) or {} for c in col.cells if c.model == model and c.dataset == d]
        for met in sources + [col.base.get((model, d)) or {}]:
            for t in _tasks_of(met):
                if t not in seen:
                    seen.add(t)
                    cols.append((d, t, None, t))
    return cols


def _params_cell(tms: list[dict]) -> tuple[int | None, str]:
    n = next((tm.get("trainable_params") for tm in tms if tm.get("trainable_params")), None)
    after = next((tm.get("params_after_norm") for tm in tms if tm.get("params_after_norm")), None)
    text = fmt_params(n)
    return n, (f"{text} → {fmt_params(after)}" if after is not None else text)


def score_table(col: Collected, table: int) -> tuple[str, list[dict]]:
    """One paper table as Markdown plus its rows (for MLflow).

    With the paper's suites (instruct, math, code, chat) the columns are the paper table's own (Tables 5, 11
    and 12 average its 8 columns, not every task); otherwise every task evaluated. A method restricted to some
    models has rows on those only; a NoRM row shows its parameters after the reduction (→).
    """
    p = col.params
    methods = [m for m in p.grid.methods if table in p.methods[m].tables]
    datasets = _table_datasets(p, table)
    if not methods or not datasets:
        return "", []
    lines, rows = [f"### {TABLE_TITLES[table]}", ""], []
    # a table whose methods are restricted to some models (Tables 5 and 11: LLaMA) shows those models only
    models = [m for m in p.grid.models if all(p.methods[x].runs_on(m) for x in methods)] or list(p.grid.models)
    for model in models:
        here = [m for m in methods if p.methods[m].runs_on(model)]
        if not here:
            continue
        cols = _paper_cols(col, model, datasets, table) or _all_cols(col, model, datasets)
        label = p.models[model].label or model
        header = ["Method", "Dom", "Params"] + [h for *_x, h in cols] + ["Avg.", "status"]
        lines += [f"**{label}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        entries = [("base", None)] + [(m, p.methods[m]) for m in here]
        for slug, spec in entries:
            vals, errs, statuses, n_params, params_text = [], [], [], None, MISSING
            for d, t, metric, _h in cols:
                eval_doc = None
                if slug == "base":
                    met = col.base.get((model, d)) or {}
                    statuses.append("ok" if met else "missing")
                    eval_doc = col.base_evals.get((model, d))
                else:
                    runs = [c for c in col.cells if (c.model, c.dataset, c.method) == (model, d, slug)]
                    met = {}
                    for c in runs:  # mean over seeds
                        statuses.append(col.status(c))
                        for k, v in (col.metrics.get(c.id) or {}).items():
                            met.setdefault(k, []).append(v)
                    met = {k: sum(v) / len(v) for k, v in met.items() if all(isinstance(x, (int, float)) for x in v)}
                    n, text = _params_cell([col.train.get(c.id) or {} for c in runs])
                    if n is not None and n_params is None:
                        n_params, params_text = n, text
                    if len(runs) == 1:  # one seed: lm-eval's standard error; over seeds the mean stands alone
                        eval_doc = col.evals.get(runs[0].id)
                key = f"{t}/{metric}"
                pm = (key, float(met[key])) if metric and isinstance(met.get(key), (int, float)) else (
                    None if metric else primary_metric(t, met))
                vals.append(_scale(t, pm[1]) if pm else None)
                se = _stderr(eval_doc, pm[0]) if pm else None
                errs.append(se * _scale(t, pm[1]) / pm[1] if se is not None and pm[1] else se)  # same units
            present = [v for v in vals if v is not None]
            avg = sum(present) / len(present) if present and len(present) == len(vals) else None
            dom = "" if slug == "base" else ("✓" if spec.placement == "dom" else "✗")
            name = "Base model" if slug == "base" else (spec.label or slug)
            status = "ok" if statuses and all(s == "ok" for s in statuses) else ", ".join(sorted(set(statuses))) or MISSING
            cells = [_fmt(v) + (f" ± {e:.1f}" if v is not None and e is not None else "") for v, e in zip(vals, errs)]
            lines.append("| " + " | ".join([name, dom, params_text] + cells + [_fmt(avg), status]) + " |")
            rows.append({"model": model, "method": slug, "params": n_params, "avg": avg, "status": status,
                         **{f"{d}/{h}": v for (d, _t, _m, h), v in zip(cols, vals)},
                         **{f"{d}/{h}_stderr": e for (d, _t, _m, h), e in zip(cols, errs) if e is not None}})
        lines.append("")
    return "\n".join(lines), rows


def efficiency_table(col: Collected) -> tuple[str, list[dict]]:
    """Table 10: wall time and peak memory per cell, with the effective batch each ran at (flagged where it
    is not the recipe's, e.g. a stage started without its processes)."""
    p = col.params
    methods = [m for m in p.grid.methods if 10 in p.methods[m].tables] or list(p.grid.methods)
    header = ["Model", "Dataset", "Method", "Trainable params", "Batch (effective)", "Backend", "Wall time (s)",
              "Step time (s)", "Tokens/s", "Peak memory (MB)", "Final loss"]
    lines = [f"### {TABLE_TITLES[10]}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for c in col.cells:
        if c.method not in methods:
            continue
        tm = col.train.get(c.id) or {}
        r = {"model": c.model, "dataset": c.dataset, "method": c.method, **train_summary(tm),
             "intended_batch": tm.get("intended_batch"), "backend": tm.get("backend")}
        rows.append(r)
        batch = _fmt(r["samples_per_step"], 0)
        if r["intended_batch"] and r["samples_per_step"] and r["intended_batch"] != r["samples_per_step"]:
            batch += f" (recipe: {r['intended_batch']})"
        lines.append("| " + " | ".join([c.model, c.dataset, p.methods[c.method].label or c.method,
                                          fmt_params(r["trainable_params"]), batch, r["backend"] or MISSING,
                                          _fmt(r["wall_time_s"], 1), _fmt(r["step_time_s"], 3),
                                          _fmt(r["tokens_per_s"], 0), _fmt(r["peak_memory_mb"], 0),
                                          _fmt(r["final_loss"], 3)]) + " |")
    return "\n".join(lines) + "\n", rows


def norm_table(col: Collected) -> tuple[str, list[dict]]:
    """NoRM's reduction per cell: the rank each module kept (of the trained r) and the parameters before and after.

    NoRM reloads the kept directions with lora_alpha = kept rank, as its reference does: the kept update has
    rank/alpha times the trained magnitude (half at alpha = 2r)."""
    rows = []
    for c in col.cells:
        tm = col.train.get(c.id) or {}
        norm = tm.get("norm")
        if not norm:
            continue
        kept = [m["kept"] for m in norm.values()]
        rank = next(iter(norm.values())).get("rank")
        rows.append({"cell": c.id, "modules": len(kept), "rank": rank, "kept_mean": sum(kept) / len(kept),
                     "kept_min": min(kept), "kept_max": max(kept), "reduced": sum(k < (m.get("rank") or k) for k, m in
                                                                                   zip(kept, norm.values())),
                     "params_before": tm.get("trainable_params"), "params_after": tm.get("params_after_norm")})
    if not rows:
        return "", []
    lines = ["### NoRM: ranks kept after the reduction", "",
             "| Cell | Modules | Trained rank | Kept rank (mean, min-max) | Modules reduced | Params before → after |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['modules']} | {r['rank']} | {r['kept_mean']:.1f} ({r['kept_min']}-"
                     f"{r['kept_max']}) | {r['reduced']} | {fmt_params(r['params_before'])} → "
                     f"{fmt_params(r['params_after'])} |")
    lines += ["", "NoRM reloads the kept directions with lora_alpha equal to the kept rank, as its reference "
              "does, so the kept update has half the trained magnitude at alpha = 2r.", ""]
    return "\n".join(lines), rows


def mc_answers_table(col: Collected) -> tuple[str, list[dict]]:
    """Per cell (and base run) and generative multiple-choice task: how the answers were read (replies with no
    letter, read by the option text) beside the accuracy and its two format-free cross-checks."""
    runs = [(c.id, col.evals.get(c.id)) for c in col.cells]
    runs += [(col.layout.base_id(m, d), doc) for (m, d), doc in col.base_evals.items()]
    rows, examples = [], []
    for run, doc in runs:
        for task, rec in ((doc or {}).get("tasks") or {}).items():
            if task not in MC_TASKS or rec.get("status") != "success" or "answers" not in rec:
                continue
            ms, a = rec.get("metrics", {}), rec["answers"]
            val = {k: (ms.get(k) or {}).get("value") for k in ("exact_match", "no_letter", "exact_match_constrained",
                                                                "acc_loglik")}
            rows.append({"run": run, "task": task, "n": a.get("n"), "option_text": a.get("read_by", {}).get("option_text"),
                         **val})
            examples += [f"- `{run}` {task}: {json.dumps(x)}" for x in a.get("no_letter_examples", [])[:1]]
    if not rows:
        return "", []

    def pct(v):
        return MISSING if v is None else f"{100 * v:.1f}"

    lines = ["### Multiple-choice answers: replies with no letter, and the accuracy read two other ways", "",
             "Accuracy reads the letter from each reply (or the one option whose text it states); a reply with "
             "neither scores 0. *Constrained*: replies with no letter followed by \"The answer is \" and the "
             "likeliest option letter (as the NoRM evaluator reads replies); *log-likelihood*: the likeliest letter "
             "right after the prompt. A gap between methods in the first column that the last two do not show is "
             "a gap in answer format, not in knowledge.", "",
             "| run | task | n | no letter (%) | read by option text | accuracy | constrained | log-likelihood |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['task']} | {r['n']} | {pct(r['no_letter'])} | {r['option_text']} | "
                     f"{pct(r['exact_match'])} | {pct(r['exact_match_constrained'])} | {pct(r['acc_loglik'])} |")
    if examples:
        lines += ["", "A reply with no letter per run and task (all kept in eval.json, `answers.no_letter_examples`):",
                  ""] + examples[:40]
    return "\n".join(lines) + "\n", rows


def dominant_table(col: Collected) -> tuple[str, list[dict]]:
    """The dominant module per backbone x probe set, and how stable it is across probe sets."""
    p = col.params
    header = ["Model", "Probe set", "dom module", "share of all PAGE", "share of down_proj PAGE", "dom bootstrap",
              "argmax", "argmax bootstrap", "argmax = dom", "`massive` predicts dom",
              "samples cut (truncated / skipped of N at length)"]
    lines = ["### Dominant adaptation module (PAGE at step 0)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for (m, d), doc in col.probes.items():
        if not doc:
            lines.append(f"| {m} | {d} | {MISSING} |" + " |" * (len(header) - 3))
            continue
        mass = col.massive.get((m, d)) or {}
        boot = doc.get("bootstrap") or {}
        r = {"model": m, "dataset": d, "dominant": doc.get("dominant"), "share_total": doc.get("dominant_share_total"),
             "share_type": doc.get("dominant_share_type"), "argmax": doc.get("argmax"), "n_layers": doc.get("n_layers"),
             "massive": mass.get("predicted"), "dom_bootstrap": boot.get("dom_stability"),
             "argmax_bootstrap": boot.get("argmax_stability")}
        r.update(probe_cut(doc))
        rows.append(r)
        pred = "" if not mass else ("yes" if r["massive"] == r["dominant"] else f"no (`{r['massive']}`)")
        lines.append(f"| {m} | {d} | `{r['dominant']}` | {_fmt(100 * (r['share_total'] or 0), 1)}% | "
                     f"{_fmt(100 * (r['share_type'] or 0), 1)}% | {_pct(r['dom_bootstrap'])} | `{r['argmax']}` | "
                     f"{_pct(r['argmax_bootstrap'])} | {'yes' if r['argmax'] == r['dominant'] else 'no'} | {pred} "
                     f"| {_fmt_cut(r)} |")
    lines += ["", "dom / argmax bootstrap: the fraction of 1000 resamples (with replacement) of the probe samples "
              "whose dom / argmax is the one the whole probe set picks (`probes.agreement.bootstrap_choice`).", ""]
    heavy = [r for r in rows if r.get("n_read") and r["n_truncated"] + r["n_skipped"] > CUT_WARN_SHARE * r["n_read"]]
    if heavy:
        lines += ["**More than a quarter of a probe set cut** at its max length: "
                  + "; ".join(f"{r['model']}/{r['dataset']} ({r['n_truncated'] + r['n_skipped']} of {r['n_read']}; "
                              f"the longest sample is {r['longest']} tokens)" if r.get("longest") else
                              f"{r['model']}/{r['dataset']} ({r['n_truncated'] + r['n_skipped']} of {r['n_read']})"
                              for r in heavy)
                  + ". Its PAGE sees mostly the start of each response; fix: raise `probe.max_lengths` for the set.", ""]
    stab = stability_lines(col)
    return "\n".join(lines + stab + backbone_lines(col, rows)), rows


def probe_cut(doc: dict) -> dict:
    """What tokenisation cut of a probe set (page.json's `samples`): truncated, skipped, read, the length."""
    smp = doc.get("samples") or {}
    return {"n_truncated": smp.get("n_truncated"), "n_skipped": smp.get("n_skipped"), "n_read": smp.get("n_read"),
            "max_length": doc.get("max_length", smp.get("max_length")), "longest": smp.get("longest")}


def _fmt_cut(r: dict) -> str:
    if r.get("n_read") is None:
        return MISSING
    return f"{r['n_truncated'] + r['n_skipped']} ({r['n_truncated']} / {r['n_skipped']} of {r['n_read']} at {r['max_length']})"


def backbone_lines(col: Collected, rows: list[dict]) -> list[str]:
    """Across backbones: where each one's dom sits (layer, depth) and whether its probe sets agree on it."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if len(models) < 2:
        return []
    out = ["**Across backbones** (is the dominant module's place the architecture's, not the task's?)", "",
           "| Model | dom on every probe set | layer / layers (depth) | share of all PAGE (range) | "
           "share of down_proj PAGE (range) | dom bootstrap (range) |", "|---|---|---|---|---|---|"]
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        doms = sorted({r["dominant"] for r in mine})
        layers = sorted({int(x.split(".")[2]) for x in doms if x and x.split(".")[2].isdigit()})
        n = mine[0].get("n_layers")
        depth = ", ".join(f"{L} / {n} ({L / n:.2f})" if n else str(L) for L in layers)
        shares = [100 * (r["share_total"] or 0) for r in mine]
        in_type = [100 * (r["share_type"] or 0) for r in mine]
        boots = [r["dom_bootstrap"] for r in mine if r.get("dom_bootstrap") is not None]
        boot = f"{_pct(min(boots))}-{_pct(max(boots))}" if boots else MISSING
        label = col.params.models[m].label or m if m in col.params.models else m
        out.append(f"| {label} | {'`' + doms[0] + '`' if len(doms) == 1 else 'differs: ' + ', '.join(doms)} | {depth} "
                   f"| {min(shares):.1f}-{max(shares):.1f}% | {min(in_type):.1f}-{max(in_type):.1f}% | {boot} |")
    out.append("")
    return out


def stability_lines(col: Collected) -> list[str]:
    """Per backbone: do the probe sets agree on dom and argmax; rank correlation; top-k overlap."""
    out = []
    for m in col.params.grid.probe_models:
        docs = {d: doc for (mm, d), doc in col.probes.items() if mm == m and doc}
        if len(docs) < 2:
            continue
        rep = compare_probes(docs, k=10)
        out += [f"**Task stability of {m}** across {len(docs)} probe sets: dom agreement "
                f"{rep.dom_agreement:.0%}, argmax agreement {rep.argmax_agreement:.0%}", "",
                "| Probe sets | same dom | same argmax | Spearman (all modules) | Spearman (down_proj) | top-10 overlap |",
                "|---|---|---|---|---|---|"]
        for pc in rep.pairs:
            out.append(f"| {pc.a} vs {pc.b} | {'yes' if pc.dom_agree else 'no'} | {'yes' if pc.argmax_agree else 'no'} | "
                       f"{pc.spearman:.3f} | {pc.spearman_down_proj:.3f} | {pc.topk_overlap:.0%} |")
        out.append("")
    return out


def results_csv(col: Collected) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", "model", "dataset", "method", "seed", "status", "key", "value"])
    for c in col.cells:
        st = col.status(c)
        met = col.metrics.get(c.id) or {}
        if not met:
            w.writerow([c.id, c.model, c.dataset, c.method, c.seed, st, "", ""])
        for k, v in sorted(met.items()):
            w.writerow([c.id, c.model, c.dataset, c.method, c.seed, st, k, v])

        for k, v in train_summary(col.train.get(c.id) or {}).items():
            if isinstance(v, (int, float)):
                w.writerow([c.id, c.model, c.dataset, c.method, c.seed, st, f"train/{k}", v])
    for (m, d), met in col.base.items():
        for k, v in sorted((met or {}).items()):
            w.writerow([f"{m}-{d}-base", m, d, "base", "", "ok", k, v])
    return buf.getvalue()


def figures(col: Collected, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    for (m, d), doc in col.probes.items():
        src = col.layout.page_png(m, d)
        if doc and src.is_file():
            dst = out / f"page_{m}_{d}.png"
            shutil.copyfile(src, dst)
            made.append(dst)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (m, d), doc in col.probes.items():
        if not doc:
            continue
        pts = sorted((v["layer"], v["PAGE"]) for v in doc["modules"].values() if v["type"] == "down_proj")
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=f"{m} / {d}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("PAGE of down_proj")
    ax.set_title("down_proj PAGE by layer, per probe set")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(save_figure(fig, out / "page_by_layer.png"))
    fig, ax = plt.subplots(figsize=(7, 3.5))

    for c in col.cells:
        pts = [(i, v) for i, v in enumerate((col.train.get(c.id) or {}).get("loss") or [], 1) if v is not None]
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=c.id)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss per cell")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(save_figure(fig, out / "loss_curves.png"))
    return made


def paper_comparison(col: Collected) -> str:
    """For the `paper` profile: our numbers beside the paper's Tables 1 and 2, per backbone."""
    parts = []
    p = col.params
    for table in (1, 2):
        datasets = _table_datasets(p, table)
        methods = [m for m in p.grid.methods if table in p.methods[m].tables]
        for model in p.grid.models:
            docs = {}
            for m in methods:
                # one method's tasks come from several training sets (Table 2: math, code, chat)
                merged = {"tasks": {}, "trainable_params": None}
                for c in col.cells:
                    if (c.model, c.method) == (model, m) and c.dataset in datasets:
                        ev = col.evals.get(c.id) or {}
                        merged["tasks"].update(ev.get("tasks", {}))
                        merged["trainable_params"] = (col.train.get(c.id) or {}).get("trainable_params")
                if merged["tasks"]:
                    docs[p.methods[m].label or m] = merged
            if not docs:
                continue
            try:
                cmp = compare_with_paper(docs, table=table, backbone=p.models[model].id)
            except Exception as exc:  # a courtesy table: never fail the report for it
                logger.warning("paper comparison (table %d, %s) failed: %s", table, model, exc)
                continue
            parts.append(f"**Table {table}, {cmp['backbone']}**\n\n{cmp['markdown']}\n")
    return "\n".join(parts)


def update_registry(col: Collected, path: Path) -> int:
    """Record every probe of the grid in the dominant-module registry (backbone -> dom module)."""
    n = 0
    for (m, d), doc in col.probes.items():
        if not doc or not doc.get("dominant"):
            continue
        spec = col.params.models[m]
        try:
            h = config_hash_of(spec.id, trust_remote_code=spec.trust_remote_code)
        except Exception as exc:  # no config at hand (offline, gated): the report goes on without it
            logger.warning("registry: cannot read the config of %s (%s); not recorded", spec.id, exc)
            continue
        record(doc, model=spec.id, config_hash=h, path=path, data=d)
        n += 1
    return n


def _stand_in_runs(col: Collected) -> list[str]:
    """Cells and base runs whose eval.json was computed on stand-in data."""
    runs = [c.id for c in col.cells if is_stand_in(col.evals.get(c.id) or {})]
    runs += [col.layout.base_id(m, d) for (m, d), doc in col.base_evals.items() if is_stand_in(doc or {})]
    return runs


def checkpoints_section(col: Collected, fig_dir: Path) -> tuple[str, list[dict]]:
    """Figure 2: PAGE across full fine-tuning checkpoints, per backbone (the curves and where `dom` sits)."""
    rows, lines = [], []
    for m, d in col.params.checkpoint_studies():
        doc = read_json_or_none(col.layout.checkpoints_json(m, d))
        label = col.params.models[m].label or m
        if not doc:
            lines += [f"**{label}** ({d}): {MISSING} (not computed)", ""]
            continue
        png = col.layout.checkpoints_json(m, d).with_suffix(".png")
        if png.is_file():
            fig_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, fig_dir / f"checkpoints_{m}_{d}.png")
        stable = "stays put" if doc.get("dominant_stable") else "moves"
        lines += [f"**{label}** ({d}): the dominant module {stable} across steps {doc.get('steps')}.", "",
                  "| Step | dom module | share of down_proj PAGE | overall argmax |", "|---|---|---|---|"]
        for r in doc.get("checkpoints", []):
            share = r.get("dominant_share_type")
            lines.append(f"| {r.get('step')} | `{r.get('dominant')}` | "
                         f"{MISSING if share is None else f'{100 * share:.1f}%'} | `{r.get('argmax')}` |")
            rows.append({"model": m, "dataset": d, "step": r.get("step"), "dominant": r.get("dominant"),
                         "share_type": share, "argmax": r.get("argmax")})
        lines += ["", f"![PAGE across checkpoints, {label}](figures/checkpoints_{m}_{d}.png)", ""]
    if not lines:
        return "", []
    return "### Figure 2: PAGE across full fine-tuning checkpoints\n\n" + "\n".join(lines), rows


def write_report(params: Params, layout: Layout, *, tracker=None, extra_sections: Sequence[str] = (),
                 registry: Path | None = None) -> dict:
    """Write reports/{README.md,tables.md,results.csv,metrics.json,figures/} (and update the registry)."""
    col = Collected(params, layout)
    if registry is not None:
        update_registry(col, registry)
    out = layout.reports
    sections, all_rows = [], {}
    for t in (1, 2, 3, 4, 5, 11, 12):
        md, rows = score_table(col, t)
        if md:
            sections.append(md)
            all_rows[f"table{t}"] = rows
    md, rows = mc_answers_table(col)
    if md:
        sections.append(md)
        all_rows["mc_answers"] = rows
    md, rows = efficiency_table(col)
    sections.append(md)
    all_rows["table10"] = rows
    md, rows = norm_table(col)
    if md:
        sections.append(md)
        all_rows["norm"] = rows
    fig2_md, rows = checkpoints_section(col, out / "figures")
    if fig2_md:
        sections.append(fig2_md)
        all_rows["figure2"] = rows
    sparse = [c for c in col.cells if params.methods[c.method].sparse_b or params.methods[c.method].grpo]
    if sparse:
        docs = [(d.get("study") or {}).get("outcome") for d in (col.train.get(c.id) for c in sparse) if d]
        docs = [d for d in docs if d]
        sections.append(render_report_section(docs))
    dom_md, dom_rows = dominant_table(col)
    all_rows["dominant"] = dom_rows
    if params.profile in ("paper", "rehearsal"):
        cmp = paper_comparison(col)
        if cmp:
            sections.append("## Beside the paper\n\n" + cmp)
    # results from stand-in data (an offline rehearsal) are marked wherever they are shown

    stand_in = _stand_in_runs(col)
    banner = [f"> **{STAND_IN_WARNING}** Runs on stand-in data: {', '.join(stand_in)}.", ""] if stand_in else []
    tables_md = "\n".join(banner) + "# Result tables\n\n" + f"Profile `{params.profile}`; cells present: " \
        f"{sum(col.status(c) == 'ok' for c in col.cells)}/{len(col.cells)}. Scores are percentages " \
        "(MT-Bench x10), mean over seeds; ± is lm-eval's standard error where one seed ran; `–` = missing.\n\n" + "\n".join(sections) + "\n" + "\n".join(extra_sections)
    figs = figures(col, out / "figures")
    statuses = {c.id: col.status(c) for c in col.cells}
    headline = {}
    for row in all_rows.get("table1", []) + all_rows.get("table2", []):
        if row.get("avg") is not None:
            headline[f"{row['model']}/{row['method']}/avg"] = row["avg"]
    summary = ["# domlora report", "", *banner, f"Profile: `{params.profile}` · grid: {len(col.cells)} cells "
               f"({', '.join(params.grid.models)} x {', '.join(params.grid.datasets)} x {', '.join(params.grid.methods)} "
               f"x seeds {params.grid.seeds})", "", dom_md, "", "## Cells", "",
               "| cell | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in statuses.items()] + [
               "", "Tables in the paper's layouts: [tables.md](tables.md). Tidy results: [results.csv](results.csv).", "",
               "## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figs]
    write_text(out / "README.md", "\n".join(summary) + "\n")
    write_text(out / "tables.md", tables_md)
    write_text(out / "results.csv", results_csv(col))
    metrics = {"cells_ok": sum(v == "ok" for v in statuses.values()), "cells_total": len(statuses), **headline}
    if stand_in:
        metrics["stand_in_runs"] = len(stand_in)
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        tracker.log_tables(all_rows, files=[out / "README.md", out / "tables.md", out / "results.csv", *figs])
    return {"statuses": statuses, "metrics": metrics, "tables": all_rows}

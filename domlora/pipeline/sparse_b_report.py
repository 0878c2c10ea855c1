"""The report's section on budgeted placement inside B: outcomes of the sparse-B and GRPO runs, where their
chosen entries land, and the structure of B's gradients (read from each run's `study.outcome`)."""
from __future__ import annotations

import math

from domlora.modules import PAPER_TYPES


def _fmt(v, spec: str = ".3f", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _pm(acc, se) -> str:
    if acc is None:
        return "–"
    return f"{acc:.3f} ± {se:.3f}" if se is not None else f"{acc:.3f}"


def render_report_section(results: list[dict]) -> str:
    """Markdown for the report: outcomes, where the chosen entries land, gradient structure.

    `results` are metrics dicts returned by `sparse_b_sft` / `grpo` (their metrics.json).
    """
    if not results:
        return "## Budgeted placement inside B\n\nNo sparse-B or GRPO runs.\n"
    rows = sorted(results, key=lambda r: (r.get("regime", ""), r.get("k") is None, r.get("k") or 0,
                                          r.get("selection") or "", r.get("seed", 0)))
    out = ["## Budgeted placement inside B (which entries, not how many)", "",
           "LoRA with A frozen and k trainable entries of B, chosen at random, by sign-consistent probe "
           "gradients (informed) or by gradient magnitude; full LoRA for reference. Eval: greedy exact match "
           "of the final `#### N` on held-out arithmetic problems (± standard error).", ""]
    out += ["| regime | method | k | budget | seed | train signal (first → last) | eval acc | "
            "scoring s | training s | scoring / training |",
            "|---|---|---:|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if r.get("regime") == "grpo":
            sig = f"reward {_fmt(r.get('reward_first'))} → {_fmt(r.get('reward_last'))}"
        else:
            sig = f"loss {_fmt(r.get('loss_first'), '.4f')} → {_fmt(r.get('loss_last'), '.4f')}"
        ev = r.get("eval") or {}
        k = r.get("k")
        frac = "–" if k is None or not r.get("score_seconds") else _fmt(100 * r["score_fraction"], ".2f") + "%"
        out.append(f"| {r.get('regime')} | {r.get('method')} | {'all' if k is None else f'{k:,}'} | "
                   f"{r.get('budget') or '–'} | {r.get('seed', 0)} | {sig} | "
                   f"{_pm(ev.get('accuracy'), ev.get('stderr'))} | {_fmt(r.get('score_seconds'), '.2f')} | "
                   f"{_fmt(r.get('train_seconds'), '.1f')} | "
                   f"{frac} |")
    landed = [r for r in rows if r.get("landing_by_type")]
    if landed:
        types = [t for t in PAPER_TYPES if any(t in r["landing_by_type"] for r in landed)]
        out += ["", "Where the chosen entries land (share of k per module type; V+O+Down in bold is the "
                "paper's finding):", "",
                "| regime | method | seed | " + " | ".join(types) + " | **V+O+Down** |",
                "|---|---|---:|" + "---:|" * len(types) + "---:|"]
        for r in landed:
            shares = r["landing_by_type"]
            out.append(f"| {r.get('regime')} | {r.get('method')} | {r.get('seed', 0)} | "
                       + " | ".join(_fmt(shares.get(t), ".2f") for t in types)
                       + f" | **{_fmt(r.get('vod_share'), '.2f')}** |")
    graded = [r for r in rows if (r.get("grad") or {}).get("steps")]
    if graded:
        out += ["", "Structure of the per-step B gradients (raw, before masking): effective rank (exp of the "
                "singular-value entropy) of each module's d_out x r gradient, its top singular value's share "
                "of the energy, the cosine between consecutive steps' gradients, and the effective rank of the "
                "steps x entries matrix of normalised gradients (how many directions the steps span):", "",
                "| regime | method | seed | steps | eff. rank / module | top-σ share | cos(step, step-1) | "
                "trajectory eff. rank | same, first 8 steps |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in graded:
            g = r["grad"]
            traj = g.get("trajectory_effective_rank")
            out.append(f"| {r.get('regime')} | {r.get('method')} | {r.get('seed', 0)} | {g['steps']} | "
                       f"{_fmt(g.get('effective_rank_mean'), '.2f')} | {_fmt(g.get('top_sv_share_mean'), '.2f')} | "
                       f"{_fmt(g.get('cos_prev_mean'), '.3f')} | "
                       f"{_fmt(traj, '.2f')} of {g.get('trajectory_steps', '–')} | "
                       f"{_fmt(g.get('trajectory_effective_rank_first8'), '.2f')} |")
    warns = [(r.get("method"), w) for r in rows for w in r.get("warnings", [])]
    if warns:
        out += ["", "Warnings:", ""] + [f"- {m}: {w}" for m, w in warns]
    return "\n".join(out) + "\n"

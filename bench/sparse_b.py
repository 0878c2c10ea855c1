"""Sparse-B LoRA on the embedded model: random vs gradient-informed entries, under SFT and GRPO.

1. SFT on the generated arithmetic task, every projection adapted (r=8): full LoRA (reference),
   sparse-B with k random entries, sparse-B with k informed entries (equal k).
2. GRPO (TRL) from the SFT full-LoRA model merged into the base (the 135M base never writes a
   parsable `#### N` answer in a short completion, so GRPO from the base has no reward signal):
   full LoRA, sparse-B random, sparse-B informed, same k, same steps.
3. The table: final train loss / reward curve, held-out exact match (± s.e.), scoring time vs
   training time, where the chosen entries land, and the B-gradient structure (effective rank,
   cosine between consecutive steps) in SFT vs GRPO.

Every run is a stage call writing its own folder under --out, and a finished run is not redone,
so an interrupted bench picks up where it stopped.

Run as: nice -n 10 .venv/bin/python bench/sparse_b.py                  (~30-60 min on 2 busy cores)
        nice -n 10 .venv/bin/python bench/sparse_b.py --sft-steps 10 --grpo-steps 3 --n-eval 16   (a quick look)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from domlora.data import prepare_dataset
from domlora.regimes.grpo import GRPOSettings, grpo
from domlora.pipeline.sparse_b_report import render_report_section
from domlora.regimes.sparse_b import SparseBSpec, sparse_b_sft
from domlora.pipeline.params import load_params

DATA_SEED = 1234


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    head = ("regime", "method", "k", "train (first -> last)", "eval acc ± se", "parse", "score s", "train s",
            "score/train", "V+O+D", "eff.rank", "cos(t,t-1)", "traj.rank")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in results:
        ev = r.get("eval") or {}
        g = r.get("grad") or {}
        if r["regime"] == "grpo":
            sig = f"reward {_fmt(r.get('reward_first'))} -> {_fmt(r.get('reward_last'))}"
        else:
            sig = f"loss {_fmt(r.get('loss_first'), '.4f')} -> {_fmt(r.get('loss_last'), '.4f')}"
        frac = r.get("score_fraction") if r.get("k") is not None and r.get("score_seconds") else None
        lines.append(" | ".join([
            r["regime"], r["method"], "all" if r.get("k") is None else f"{r['k']:,}", sig,
            f"{_fmt(ev.get('accuracy'))} ± {_fmt(ev.get('stderr'))}", _fmt(ev.get("parse_rate"), ".2f"),
            _fmt(r.get("score_seconds"), ".2f"), _fmt(r.get("train_seconds"), ".1f"),
            "–" if frac is None else f"{100 * frac:.2f}%", _fmt(r.get("vod_share"), ".2f"),
            _fmt(g.get("effective_rank_mean"), ".2f"), _fmt(g.get("cos_prev_mean"), ".3f"),
            f"{_fmt(g.get('trajectory_effective_rank'), '.2f')}/{g.get('trajectory_steps', '–')}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scratch/bench_sparse_b", help="where the runs and the report go")
    p.add_argument("--model", default="embedded")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--k", type=int, default=12_000, help="trainable B entries (of 1.24M in B at r=8, every module)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--sft-steps", type=int, default=24)
    p.add_argument("--sft-lr-full", type=float, default=1e-3, help="full LoRA learning rate")
    p.add_argument("--sft-lr-sparse", type=float, default=1e-2,
                   help="sparse-B learning rate (few entries need larger steps; equal for random and informed)")
    p.add_argument("--grpo-steps", type=int, default=8)
    p.add_argument("--grpo-lr-full", type=float, default=5e-4)
    p.add_argument("--grpo-lr-sparse", type=float, default=5e-3)
    p.add_argument("--probe-steps", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=48, help="greedy tokens per eval answer")
    p.add_argument("--completion-tokens", type=int, default=48, help="GRPO tokens per sampled completion")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 keeps a shared, oversubscribed CPU from thrashing)")
    p.add_argument("--no-grpo", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(a.out)
    data = out / "data"
    prepare_dataset("arith", data, n_train=a.n_train, n_probe=0, n_eval=a.n_eval, seed=DATA_SEED)
    train, ev = data / "train.jsonl", data / "eval.jsonl"
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    # the embedded profile's recipe, as the grid's sparse-B methods use it
    base = load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile="embedded").train
    results: list[dict] = []
    for seed in seeds:
        for name, k, sel in (("full", None, None), ("random", a.k, "random"), ("informed", a.k, "informed")):
            lr = a.sft_lr_full if k is None else a.sft_lr_sparse
            cfg = base.replace(rank=a.rank, alpha=2.0 * a.rank, lr=lr, max_steps=a.sft_steps, save_every=10, seed=seed)
            spec = None if k is None else SparseBSpec(k=k, selection=sel, probe_steps=a.probe_steps)
            r = sparse_b_sft(model=a.model, train_data=train, placement=None, out_dir=out / "sft" / f"{name}-{seed}",
                             cfg=cfg, spec=spec, eval_data=ev, n_eval=a.n_eval, eval_max_new_tokens=a.eval_tokens)
            results.append(r)
        if a.no_grpo:
            continue
        warm = out / "sft" / f"full-{seed}" / "adapter"
        for name, k, sel in (("full", None, None), ("random", a.k, "random"), ("informed", a.k, "informed")):
            settings = GRPOSettings(prompts_per_step=2, num_generations=4, max_completion_length=a.completion_tokens,
                                    temperature=0.8, n_eval=a.n_eval, eval_max_new_tokens=a.eval_tokens)
            cfg = base.replace(rank=a.rank, alpha=2.0 * a.rank, max_steps=a.grpo_steps, seed=seed,
                               lr=a.grpo_lr_full if k is None else a.grpo_lr_sparse, lr_schedule="constant",
                               warmup_ratio=0.0)
            spec = None if k is None else SparseBSpec(k=k, selection=sel, probe_steps=a.probe_steps,
                                                      probe_batch_size=1)
            r = grpo(model=a.model, train_data=train, eval_data=ev, placement=None,
                     out_dir=out / "grpo" / f"{name}-{seed}", cfg=cfg, settings=settings, sparse_b=spec,
                     init_adapter=warm)
            results.append(r)
    print()
    print(table(results))
    print()
    for r in results:
        if r["regime"] == "grpo":
            curve = " ".join(f"{c['reward']:.2f}" for c in r.get("reward_curve", []))
            print(f"{r['method']} reward per step: {curve}")
    report = render_report_section(results)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nreport section: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

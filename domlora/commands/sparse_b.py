"""`domlora sparse-b`: LoRA with A frozen and only k chosen entries of B trainable, under SFT or GRPO.

Run as: domlora sparse-b --regime sft --model embedded --train-data data/arith/train.jsonl \
            --eval-data data/arith/eval.jsonl --placement placements/all.json --k 10000 --selection informed \
            --out runs/sparse_b/sft_informed
        domlora sparse-b --regime grpo ... --k none      # full LoRA reference
"""
from __future__ import annotations

import argparse
import json

from domlora.commands._args import MODEL_HELP
from domlora.config import from_dict
from domlora.errors import DomloraError
from domlora.pipeline.params import load_params
from domlora.regimes.grpo import GRPOSettings, grpo
from domlora.regimes.settings import BUDGETS, SELECTIONS, SparseBSpec
from domlora.regimes.sparse_b import sparse_b_sft
from domlora.train.config import TrainConfig

HELP = "train sparse-B LoRA (k chosen entries of B, A frozen) with SFT or GRPO, or full LoRA for reference"


def _k(text: str) -> int | None:
    if text.lower() in ("none", "full"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be an integer or `none` (full LoRA), got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regime", choices=("sft", "grpo"), required=True, help="supervised fine-tuning or GRPO")
    p.add_argument("--model", default="embedded", help=MODEL_HELP)
    p.add_argument("--train-data", required=True, help="chat JSONL; for GRPO assistant turns end with `#### <int>`")
    p.add_argument("--eval-data", default=None, help="eval JSONL with question/answer rows (required for GRPO)")
    p.add_argument("--placement", default=None, help="placement JSON (default: every projection)")
    p.add_argument("--out", required=True, help="output folder: adapter/ (with diagnostics.json), train_metrics.json")
    p.add_argument("--k", type=_k, required=True, help="trainable B entries in total, or `none` for full LoRA")
    p.add_argument("--selection", choices=SELECTIONS, default="informed", help="how the k entries are chosen")
    p.add_argument("--budget", choices=BUDGETS, default="global",
                   help="global: best k anywhere; per_module: k split over modules by B's size")
    p.add_argument("--seed", type=int, default=0, help="seeds A, data order, selection and sampling")
    p.add_argument("--probe-steps", type=int, default=4, help="probe gradients the scores average over")
    p.add_argument("--params", default="params.yaml", help="params file of --profile")
    p.add_argument("--profile", default="embedded", help="the recipe is this profile's `train:` section")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the profile's)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--n-eval", type=int, default=40, help="evaluate on the first N eval rows")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO group size")
    p.add_argument("--prompts-per-step", type=int, default=2, help="GRPO prompts per optimizer step")
    p.add_argument("--max-completion-length", type=int, default=64, help="GRPO tokens per completion")
    p.add_argument("--system-prompt", default=None, help="GRPO: a system turn added to every prompt")


def run(a: argparse.Namespace) -> int:
    import dataclasses

    over = {"rank": a.rank, "alpha": a.alpha, "seed": a.seed}
    if a.steps is not None:
        over["max_steps"] = a.steps
    if a.lr is not None:
        over["lr"] = a.lr
    base = dataclasses.asdict(load_params(a.params, profile=a.profile).train)
    cfg = from_dict(TrainConfig, base | over, where="train")
    spec = None if a.k is None else SparseBSpec(k=a.k, selection=a.selection, budget=a.budget,
                                                probe_steps=a.probe_steps, seed=a.seed)
    if a.regime == "grpo":
        if a.eval_data is None:
            raise DomloraError("GRPO needs --eval-data (question/answer rows) to report accuracy; fix: pass the "
                               "arith eval split, e.g. data/arith/eval.jsonl")
        settings = GRPOSettings(n_eval=a.n_eval, num_generations=a.num_generations,
                                prompts_per_step=a.prompts_per_step, max_completion_length=a.max_completion_length,
                                system_prompt=a.system_prompt)
        if spec is not None:
            spec = dataclasses.replace(spec, probe_batch_size=1)  # one prompt (a group) per probe step
        m = grpo(model=a.model, train_data=a.train_data, eval_data=a.eval_data, placement=a.placement,
                 out_dir=a.out, cfg=cfg, settings=settings, sparse_b=spec, show_progress=True)
    else:
        m = sparse_b_sft(model=a.model, train_data=a.train_data, placement=a.placement, out_dir=a.out, cfg=cfg,
                         spec=spec, eval_data=a.eval_data, n_eval=a.n_eval, show_progress=True)
    keys = ("method", "k", "trainable_entries", "steps", "score_seconds", "score_fraction", "train_seconds",
            "eval_accuracy", "loss_first", "loss_last", "reward_first", "reward_last", "vod_share", "warnings")
    print(json.dumps({k: m.get(k) for k in keys if k in m}, default=str))
    return 0

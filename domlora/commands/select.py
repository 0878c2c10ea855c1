"""`domlora select`: turn probe scores into a placement."""
from __future__ import annotations

import argparse
import json

from domlora.errors import DomloraError
from domlora.pipeline.stages.select import select_placement
from domlora.placement import STRATEGIES

HELP = "turn probe scores into a placement (exact module names + evidence)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", required=True, help="page.json written by `domlora probe`")
    p.add_argument("--strategy", required=True, help=f"one of: {', '.join(sorted(STRATEGIES))}")
    p.add_argument("--out", required=True, help="placement JSON to write")
    p.add_argument("--nfn", default=None, help="nfn.json for plop / plop_inverse (default: beside --probe)")
    p.add_argument("--activations", default=None,
                   help="massive.json from `domlora diagnose`, for `massive` (default: beside --probe)")
    p.add_argument("--k", type=int, default=3, help="modules (page_topk, random) or types (plop)")
    p.add_argument("--types", default="", help="comma list of types or groups (ffn_all, attn_all)")
    p.add_argument("--layers", default="", help="comma list of layer indices (explicit; -1 = last)")
    p.add_argument("--seed", type=int, default=0, help="seed for `random`")
    p.add_argument("--budget", type=float, default=None,
                   help="page_budget / page_rank: trainable LoRA parameters to spend (e.g. 3e6)")
    p.add_argument("--budget-fraction", type=float, default=None,
                   help="page_budget / page_rank: the budget as a fraction of vanilla LoRA's at --rank (e.g. 0.16)")
    p.add_argument("--total-rank", type=int, default=None, help="page_rank: the total rank to spread by PAGE")
    p.add_argument("--max-modules", type=int, default=None,
                   help="page_rank: spread over the top N modules by PAGE (default: every candidate)")
    p.add_argument("--rank", type=int, default=64, help="page_budget's rank per module; the rank of the vanilla LoRA "
                                                        "a --budget-fraction is taken of (default 64)")
    p.add_argument("--alpha", type=float, default=None,
                   help="LoRA alpha at --rank (default 2 x rank); page_rank keeps alpha / r per module")
    p.add_argument("--model", default=None, help="for the strategies that read the model (kappa, aletheia, eva, and "
                                                 "massive without --activations): `embedded`, a hub id or a folder")
    p.add_argument("--data", default=None, help="chat JSONL those strategies read (aletheia, massive: the probe set; "
                                                "eva: the training data)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a peer option (value parsed as YAML), e.g. --option num_modules=1 for kappa; repeatable")
    p.add_argument("--samples", type=int, default=32, help="samples of --data aletheia / massive read")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample for aletheia / massive")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DomloraError(f"--layers must be a comma list of integers, got {text!r}") from None


def _options(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DomloraError(f"--option {item!r} must be KEY=VALUE, e.g. --option num_modules=1")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _budget(a: argparse.Namespace) -> dict | None:
    from domlora.placement import BUDGET_STRATEGIES

    given = {"budget": a.budget, "budget_fraction": a.budget_fraction, "total_rank": a.total_rank,
             "max_modules": a.max_modules}
    if a.strategy not in BUDGET_STRATEGIES:
        flags = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if flags:
            raise DomloraError(f"{', '.join(flags)} apply to page_budget and page_rank, not {a.strategy!r}; fix: drop "
                               "them or choose one of those strategies")
        return None
    return given | {"rank": a.rank, "alpha": a.alpha}


def run(a: argparse.Namespace) -> int:
    doc = select_placement(probe_path=a.probe, strategy=a.strategy, out=a.out, nfn_path=a.nfn, k=a.k,
                           types=tuple(t for t in a.types.split(",") if t), layers=_ints(a.layers), seed=a.seed,
                           activations_path=a.activations, model=a.model, data=a.data, options=_options(a.option),
                           samples=a.samples, max_length=a.max_length, budget=_budget(a))
    summary = {"strategy": doc["strategy"], "n_modules": doc["n_modules"], "modules": doc["modules"][:8]}
    for key in ("lora_params", "budget_params", "total_rank"):
        if key in (doc.get("evidence") or {}):
            summary[key] = doc["evidence"][key]
    if "cost" in doc:
        summary["cost"] = doc["cost"]
    print(json.dumps(summary))
    return 0

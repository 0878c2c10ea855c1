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


def run(a: argparse.Namespace) -> int:
    doc = select_placement(probe_path=a.probe, strategy=a.strategy, out=a.out, nfn_path=a.nfn, k=a.k,
                           types=tuple(t for t in a.types.split(",") if t), layers=_ints(a.layers), seed=a.seed,
                           activations_path=a.activations, model=a.model, data=a.data, options=_options(a.option),
                           samples=a.samples, max_length=a.max_length)
    summary = {"strategy": doc["strategy"], "n_modules": doc["n_modules"], "modules": doc["modules"][:8]}
    if "cost" in doc:
        summary["cost"] = doc["cost"]
    print(json.dumps(summary))
    return 0

"""`domlora params`: count adapter parameters from a model config alone (meta device, no weights)."""
from __future__ import annotations

import argparse
import json

from domlora.adapters.variants import VARIANTS, count_placement
from domlora.errors import DomloraError

HELP = "count trainable/total parameters of an adapter placement from a config.json (no weights needed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a Hugging Face config.json, or a name under configs/ "
                   "(Qwen3-8B, Llama-3.1-8B-Instruct)")
    p.add_argument("--strategy", required=True, choices=["all", "explicit", "types"],
                   help="all projections, --layers x --types, or --types in every layer")
    p.add_argument("--layers", default="", help="comma list of layers (explicit; -1 = last)")
    p.add_argument("--types", default="", help="comma list of types or groups (ffn_all, attn_all)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--variant", default="lora", choices=VARIANTS, help="adapter variant")


def run(a: argparse.Namespace) -> int:
    try:
        layers = tuple(int(x) for x in a.layers.split(",") if x.strip())
    except ValueError:
        raise DomloraError(f"--layers must be a comma list of integers, got {a.layers!r}") from None
    types = tuple(t for t in a.types.split(",") if t.strip())
    counts = count_placement(a.config, strategy=a.strategy, layers=layers, types=types, rank=a.rank,
                             alpha=a.alpha, variant=a.variant)
    print(json.dumps(counts))
    return 0

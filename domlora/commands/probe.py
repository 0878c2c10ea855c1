"""`domlora probe`: every step-0 signal in one pass: PAGE, NFN (PLoP) and the activation statistics."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from domlora.commands._args import add_lora_shape, add_model, add_samples
from domlora.pipeline.stages.probe import probe


HELP = "score every module by PAGE, NFN and the activation statistics, in one pass"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_samples(p)
    p.add_argument("--out", required=True, help="output folder: page.json, page.png, nfn.json, activations.json, "
                   "massive.json, activations.png")
    add_lora_shape(p)
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="samples per forward/backward, or auto: the largest whose batches fit --memory-fraction of "
                        "the free memory (the scores do not change)")
    p.add_argument("--memory-fraction", type=float, default=0.5,
                   help="share of the free memory (RAM, or the GPU's) the pass's activations may use")
    add_model(p, dtypes="float64, float16")
    p.add_argument("--no-nfn", action="store_true", help="skip the NFN (PLoP) scores: no nfn.json, so no `plop`")
    p.add_argument("--no-activations", action="store_true",
                   help="skip the activation statistics: no activations.json / massive.json, so no `massive`")
    p.add_argument("--massive-rule", default="onset", choices=("onset", "largest_jump", "largest_output"),
                   help="the forward-only predictor's rule written to massive.json")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def run(a: argparse.Namespace) -> int:
    doc = probe(model=a.model, data=a.data, out_dir=a.out, samples=a.samples, max_length=a.max_length,
                alpha=a.alpha, rank=a.rank, batch_size=a.batch_size, memory_fraction=a.memory_fraction,
                dtype=a.dtype, device=a.device, nfn=not a.no_nfn, activations=not a.no_activations,
                massive_rule=a.massive_rule, trust_remote_code=a.trust_remote_code, show_progress=True)
    print(json.dumps({"dominant": doc["dominant"], "argmax": doc["argmax"],
                      "dominant_share_total": doc.get("dominant_share_total"), "out": str(Path(a.out) / "page.json")}))
    return 0

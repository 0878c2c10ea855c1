"""`domlora decompose`: each module's PAGE split into sink / rest parts, G_i effective rank, bootstrap."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from domlora.commands._args import add_lora_shape, add_model, add_samples
from domlora.studies.decompose import decompose

HELP = "split PAGE into what flows through the sink token(s) and the rest; effective rank; bootstrap"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_samples(p)
    p.add_argument("--out", required=True, help="output folder: decompose.json")
    add_lora_shape(p)
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward/backward")
    p.add_argument("--sink", default="first", choices=("first", "massive"),
                   help="sink positions: the first token, or every position holding a massive activation")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the probe samples (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_model(p)


def run(a: argparse.Namespace) -> int:
    doc = decompose(model=a.model, data=a.data, out_dir=a.out, samples=a.samples, max_length=a.max_length,
                    alpha=a.alpha, rank=a.rank, batch_size=a.batch_size, sink=a.sink, n_boot=a.bootstrap,
                    seed=a.seed, dtype=a.dtype, device=a.device, trust_remote_code=a.trust_remote_code,
                    show_progress=True)
    split = doc.get("dominant_split") or {}
    print(json.dumps({"dominant": doc["with_sink"]["dominant"], "sink_share": split.get("sink_share"),
                      "top_sv_share": split.get("top_sv_share"),
                      "dominant_without_sink": doc["without_sink"]["dominant"],
                      "dom_bootstrap_stability": (doc.get("bootstrap") or {}).get("dom_stability"),
                      "out": str(Path(a.out) / "decompose.json")}))
    return 0

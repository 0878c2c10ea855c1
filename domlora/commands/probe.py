"""`domlora probe`: score every module by PAGE (and NFN)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


HELP = "score every module by PAGE (and NFN)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="`embedded`, a hub id or a local checkpoint folder")
    p.add_argument("--data", required=True, help="chat JSONL ({'messages': [...]} per line)")
    p.add_argument("--out", required=True, help="output folder: page.json, page.png, nfn.json")
    p.add_argument("--samples", type=int, default=32, help="probe samples N (the first N of --data)")
    p.add_argument("--max-length", type=int, default=256, help="truncate samples to this many tokens")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha PAGE is computed for")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank PAGE is computed for")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples per forward/backward: more use more memory, the scores do not change")
    p.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (GPU default), float64, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-nfn", action="store_true", help="skip the NFN (PLoP) scores")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")


def run(a: argparse.Namespace) -> int:
    from domlora.pipeline.stages import probe

    doc = probe(model=a.model, data=a.data, out_dir=a.out, samples=a.samples, max_length=a.max_length,
                alpha=a.alpha, rank=a.rank, batch_size=a.batch_size, dtype=a.dtype, device=a.device,
                nfn=not a.no_nfn, trust_remote_code=a.trust_remote_code, show_progress=True)
    print(json.dumps({"dominant": doc["dominant"], "argmax": doc["argmax"],
                      "dominant_share_total": doc.get("dominant_share_total"), "out": str(Path(a.out) / "page.json")}))
    return 0

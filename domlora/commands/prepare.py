"""`domlora prepare`: write a dataset's train / probe / eval chat JSONL and stats.json."""
from __future__ import annotations

import argparse
import json

from domlora.data import DATASETS, prepare_dataset

HELP = "write a dataset's train/probe/eval chat JSONL (+ stats.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--out", required=True, help="output folder: train.jsonl, probe.jsonl, eval.jsonl, stats.json")
    p.add_argument("--n-train", type=int, default=1000, help="training samples (default 1000)")
    p.add_argument("--n-probe", type=int, default=32, help="probe samples for PAGE (default 32, as the paper)")
    p.add_argument("--n-eval", type=int, default=100, help="held-out evaluation samples (default 100)")
    p.add_argument("--seed", type=int, default=0, help="shuffle / generation seed")
    p.add_argument("--source", default=None,
                   help="a local .jsonl/.parquet file or folder, or another hub id, instead of the default source")
    p.add_argument("--max-length-chars", type=int, default=None,
                   help="drop samples whose messages total more characters than this")


def run(a: argparse.Namespace) -> int:
    stats = prepare_dataset(a.dataset, a.out, n_train=a.n_train, n_probe=a.n_probe, n_eval=a.n_eval, seed=a.seed,
                            source=a.source, max_length_chars=a.max_length_chars, show_progress=True)
    print(json.dumps({"dataset": stats["dataset"], "counts": stats["counts"], "short": stats["short"],
                      "content_hash": stats["content_hash"], "out": str(a.out)}))
    return 0

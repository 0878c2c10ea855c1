"""Base-model accuracy on the generated tasks' eval split (greedy, chat template), to check difficulty.

Run as: nice -n 10 .venv/bin/python scripts/data_baseline.py --n 48 --tasks arith strings
"""
from __future__ import annotations

import argparse
import sys
import math
import tempfile
import time
from collections import Counter

import torch

from domlora.data import extract_final_answer, prepare_dataset
from domlora.evaluate.scoring import is_correct
from domlora.models import load_model
from domlora.samples import prompt_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tasks", nargs="+", default=["arith", "strings"])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(a.model)
    tok, model = lm.tokenizer, lm.model
    print(f"model {a.model}, greedy, max_new_tokens {a.max_new_tokens}, eval split seed {a.seed}", flush=True)
    print(f"| task | n | exact match | stderr | has `####` | s/example |")
    print("|---|---|---|---|---|---|")
    for task in a.tasks:
        with tempfile.TemporaryDirectory() as d:
            import json
            from pathlib import Path
            prepare_dataset(task, d, n_train=0, n_probe=0, n_eval=a.n, seed=a.seed)
            rows = [json.loads(x) for x in Path(d, "eval.jsonl").read_text().splitlines()]
        hits, fmt, t0 = 0, 0, time.perf_counter()
        by_kind: Counter = Counter()
        for i in range(0, len(rows), a.batch_size):
            batch = rows[i:i + a.batch_size]
            enc = prompt_batch(tok, [r["messages"][:-1] for r in batch])
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for r, seq in zip(batch, out[:, enc["input_ids"].shape[1]:]):
                gen = tok.decode(seq, skip_special_tokens=True)
                fmt += extract_final_answer(gen) is not None
                hits += is_correct(gen, r["answer"])
            print(f"{task}: {min(i + a.batch_size, len(rows))}/{len(rows)} done, {hits} right, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        n = len(rows)
        p = hits / n
        dt = (time.perf_counter() - t0) / n
        print(f"| {task} | {n} | {p:.3f} | {math.sqrt(p * (1 - p) / n):.3f} | {fmt / n:.2f} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()

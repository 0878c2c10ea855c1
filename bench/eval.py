"""Evaluation throughput and the base model's embedded-suite scores, in one run.

1. Throughput: the first --per-task examples of each embedded task (arith, strings,
   humaneval_local), evaluated through `domlora.evaluate.run.evaluate` at lm-eval batch size 1 and
   at each of --batch-sizes, side by side (examples/s; the ratio is what the machine noise
   leaves intact).
2. Scores: the whole embedded suite at domlora's CPU batch size: value +- standard error, n.

Run as: nice -n 10 .venv/bin/python bench/eval.py --no-scores     (throughput: ~25 min on 2 busy shared cores)
        nice -n 10 .venv/bin/python bench/eval.py --scores-only   (base scores: ~10-25 min)
        nice -n 10 .venv/bin/python bench/eval.py --per-task 2 --no-scores   (a quick look)
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

from domlora.data import prepare_dataset
from domlora.evaluate.lm import CPU_BATCH_SIZE
from domlora.evaluate.run import evaluate
from domlora.evaluate.tasks import SUITES

# the embedded profile's eval split sizes (params.yaml: datasets.*.n_eval)
EVAL_SIZES = {"arith": 60, "strings": 40, "humaneval": 40}
SEED = 1234


def prepare(data_dir: Path) -> None:
    for name, n in EVAL_SIZES.items():
        prepare_dataset(name, data_dir / name, n_train=4, n_probe=4, n_eval=n, seed=SEED)


def _cpu_s() -> float:
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def run(model: str, data_dir: Path, out: Path, *, batch_size, limit=None, threads=None) -> tuple[dict, float, float]:
    """One evaluate() call; returns (eval.json doc, wall seconds, CPU seconds of this process + children)."""
    t0, c0 = time.perf_counter(), _cpu_s()
    doc = evaluate(model=model, adapter=None, tasks="embedded", out=out, data_dir=data_dir, limit=limit,
                   batch_size=batch_size, allow_code_exec=True, num_threads=threads)
    return doc, time.perf_counter() - t0, _cpu_s() - c0


def throughput(a, data: Path, tmp: Path, tasks: list[str]) -> dict:
    """Batch size 1 and each of --batch-sizes on the same first --per-task examples; prints the table."""
    sizes = [1] + [int(b) for b in a.batch_sizes.split(",") if b.strip() and int(b) != 1]
    run(a.model, data, tmp / "warmup.json", batch_size=1, limit=1, threads=a.threads)  # first-call costs
    rows = {bs: {"n": 0, "wall_s": 0.0, "cpu_s": 0.0, "per_task_s": dict.fromkeys(tasks, 0.0)} for bs in sizes}
    scores = {}
    for rep in range(a.repeats):  # interleaved, so a change in machine load hits every batch size alike
        for bs in (sizes if rep % 2 == 0 else sizes[::-1]):
            doc, wall, cpu = run(a.model, data, tmp / f"tp_bs{bs}_{rep}.json", batch_size=bs, limit=a.per_task,
                                 threads=a.threads)
            r = rows[bs]
            r["n"] += sum(t["n"] for t in doc["tasks"].values())
            r["wall_s"] += sum(t["wall_s"] for t in doc["tasks"].values())
            r["cpu_s"] += cpu
            for t in tasks:
                r["per_task_s"][t] += doc["tasks"][t]["wall_s"]
            scores[bs] = {f"{t}/{m}": round(v["value"], 4) for t in tasks for m, v in doc["tasks"][t]["metrics"].items()}
    print(f"\nThroughput, embedded suite, first {a.per_task} examples per task ({', '.join(tasks)}), greedy, "
          f"model={a.model}, {a.threads} torch thread(s), {a.repeats} interleaved repeat(s)")
    print("| lm-eval batch size | examples | wall s | examples/s | speed-up | examples/CPU-s | speed-up (CPU) | "
          + " | ".join(f"{t} ex/s" for t in tasks) + " |")
    print("|---" * (7 + len(tasks)) + "|")
    base, base_cpu = rows[1]["n"] / rows[1]["wall_s"], rows[1]["n"] / rows[1]["cpu_s"]
    for bs, r in rows.items():
        eps, epc = r["n"] / r["wall_s"], r["n"] / r["cpu_s"]
        per = " | ".join(f"{r['n'] / len(tasks) / r['per_task_s'][t]:.3f}" for t in tasks)
        print(f"| {bs} | {r['n']} | {r['wall_s']:.1f} | {eps:.3f} | {eps / base:.2f}x | {epc:.3f} | "
              f"{epc / base_cpu:.2f}x | {per} |")
    same = all(scores[bs] == scores[1] for bs in scores)
    print(f"every metric identical across batch sizes: {same} ({scores[1]})")
    return rows


def scores(a, data: Path, tmp: Path, tasks: list[str]) -> dict:
    """The whole embedded suite at domlora's CPU batch size; prints value +- stderr per metric."""
    doc, wall, _ = run(a.model, data, tmp / "scores.json", batch_size="auto", threads=a.threads)
    print(f"\nBase model ({a.model}) on the embedded suite (full eval splits), batch size "
          f"{doc['settings']['batch_size_used']}, {a.threads} torch thread(s), {wall:.0f} s")
    print("| task | metric | value | stderr | n | examples/s |")
    print("|---|---|---|---|---|---|")
    for t in tasks:
        r = doc["tasks"][t]
        for m, v in r["metrics"].items():
            se = "–" if v["stderr"] is None else f"{v['stderr']:.3f}"
            print(f"| {t} | {m} | {v['value']:.3f} | {se} | {v['n']} | {r['examples_per_s']:.3f} |")
    return {t: doc["tasks"][t] for t in tasks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--per-task", type=int, default=16, help="examples per task in the throughput runs")
    ap.add_argument("--batch-sizes", default=f"{CPU_BATCH_SIZE}", help="batch sizes compared with 1, comma list")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the 2 cores are shared, and more threads wait on each other)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the throughput runs")
    ap.add_argument("--no-scores", action="store_true", help="skip the full-suite score run")
    ap.add_argument("--scores-only", action="store_true", help="skip the throughput runs")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = SUITES["embedded"]
    report: dict = {"model": a.model, "per_task": a.per_task, "throughput": None, "scores": None}
    with tempfile.TemporaryDirectory(prefix="domlora-bench-eval-") as tmp:
        tmp = Path(tmp)
        prepare(tmp / "data")
        if not a.scores_only:
            report["throughput"] = throughput(a, tmp / "data", tmp, tasks)
        if not a.no_scores:
            report["scores"] = scores(a, tmp / "data", tmp, tasks)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

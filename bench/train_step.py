"""Training-step time and peak memory per placement on the embedded model, side by side in one run.

Each configuration runs in its own fresh process (so peak memory is its own) through the real
training loop (`domlora.train.loop.train`); configurations are interleaved over `--rounds` to spread
the noise of a shared machine, and the table reports medians and ratios to vanilla LoRA. Besides
wall time, each step's CPU time (process time, all threads) is reported: on a busy shared
machine it is the steadier measure of the work a step does.

Run as: nice -n 10 .venv/bin/python bench/train_step.py [--steps 4] [--rounds 2] [--batch-size 4]
        [--max-length 256] [--rank 64] [--threads 1] [--no-gradient-checkpointing] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (description, placement spec for domlora.placement `explicit`/`types`/`all`, variant)
CONFIGS = {
    "frozen_forward": ("forward pass only, no grad", None, None),
    "domlora_L11": ("LoRA on layer 11 down_proj", {"strategy": "explicit", "layers": [11], "types": ["down_proj"]},
                    "lora"),
    "domlora_L1": ("LoRA on layer 1 down_proj", {"strategy": "explicit", "layers": [1], "types": ["down_proj"]},
                   "lora"),
    "lora_all": ("vanilla LoRA: 7 types x 30 layers", {"strategy": "all"}, "lora"),
    "plop_vod": ("PLoP-style: v/o/down_proj x 30 layers",
                 {"strategy": "types", "types": ["v_proj", "o_proj", "down_proj"]}, "lora"),
    "full_ft": ("full fine-tuning, every parameter", {"strategy": "all"}, "full"),
}


class RssPeak:
    """Poll this process's resident set size in a thread; `peak` is the largest seen."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.every_s = every_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def child(a) -> dict:
    """Measure one configuration in this process and return its numbers."""
    import gc

    import psutil
    import torch

    torch.set_num_threads(a.threads)
    from domlora.models import load_model
    from domlora.modules import find_candidates
    from domlora.placement import PlacementSpec, select
    from domlora.samples import collate, encode_samples, read_samples
    from domlora.train.config import TrainConfig
    from domlora.train.loop import train
    from domlora.train.plan import StepPlan

    desc, spec, variant = CONFIGS[a.child]
    loaded = load_model("embedded", device="cpu", dtype="float32")
    gc.collect()
    base_rss = psutil.Process().memory_info().rss
    total = a.warmup + a.steps
    cfg = TrainConfig(variant=variant or "lora", rank=a.rank, alpha=2.0 * a.rank, lr=1e-4, max_steps=total,
                      batch_size=a.batch_size, grad_accum=1, max_length=a.max_length, save_every=0,
                      gradient_checkpointing=a.gc, warmup_ratio=0.0)
    peaks: list[int] = []
    if spec is None:  # frozen forward on the very batches training uses
        enc, _ = encode_samples(loaded.tokenizer, read_samples(a.data), max_length=a.max_length)
        plan = StepPlan.make(len(enc), cfg, 1)
        lengths = [len(e.input_ids) for e in enc]
        times, cpu = [], []
        rss = RssPeak()
        with torch.no_grad():
            for s in range(total):
                (idx,) = plan.micro_batches(s, rank=0, world=1, batch_size=cfg.batch_size, lengths=lengths)
                batch = collate([enc[i] for i in idx], pad_id=loaded.tokenizer.pad_token_id)
                t0, c0 = time.perf_counter(), time.process_time()
                loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        peak = rss.stop()
        return {"name": a.child, "step_s": times[a.warmup:], "step_cpu_s": cpu[a.warmup:],
                "peak_rss_mb": peak / 2**20, "base_rss_mb": base_rss / 2**20, "trainable_params": 0, "modules": 0}
    cands = find_candidates(loaded.model)
    table = {c.name: {"type": c.type, "layer": c.layer} for c in cands}
    placement = select(PlacementSpec(strategy=spec["strategy"], types=tuple(spec.get("types", ())),
                                     layers=tuple(spec.get("layers", ()))), modules=table).modules
    hook = None
    if variant == "full":
        def hook(net):  # every parameter, not only the projections
            for p in net.parameters():
                p.requires_grad_(True)
    marks: list[float] = []  # process time at the end of each step

    def on_step(step, m):
        marks.append(time.process_time())
        peaks.append(rss.peak)

    rss = RssPeak()
    with tempfile.TemporaryDirectory(dir=a.tmp) as out:
        doc = train(model=loaded, train_data=a.data, placement=placement, out_dir=out, cfg=cfg, model_hook=hook,
                    on_step=on_step)
    rss.stop()
    cpu = [b - a_ for a_, b in zip(marks, marks[1:])]  # step i's CPU time = mark[i] - mark[i-1]
    return {"name": a.child, "step_s": doc["step_time_s"][a.warmup:], "step_cpu_s": cpu[a.warmup - 1:],
            "peak_rss_mb": max(peaks) / 2**20, "base_rss_mb": base_rss / 2**20,
            "trainable_params": doc["trainable_params"], "modules": doc["n_modules"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1: on a shared, loaded machine two threads contend badly)")
    p.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return 0

    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        from domlora.data import prepare_dataset

        prepare_dataset("arith", tmp, n_train=64, n_probe=0, n_eval=1, seed=1234)
        data = os.path.join(tmp, "train.jsonl")
        for r in range(a.rounds):
            for name in names:
                cmd = [sys.executable, __file__, "--child", name, "--data", data, "--tmp", tmp,
                       "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
                       "--max-length", str(a.max_length), "--rank", str(a.rank), "--threads", str(a.threads)]
                if not a.gc:
                    cmd.append("--no-gradient-checkpointing")
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      env=os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    return 1
                res = json.loads(proc.stdout.split("RESULT ", 1)[1])
                results[name].append(res)
                print(f"round {r + 1}/{a.rounds} {name:15s} step {statistics.median(res['step_s']):.3f} s  "
                      f"cpu {statistics.median(res['step_cpu_s']):.3f} s  peak {res['peak_rss_mb']:.0f} MB",
                      file=sys.stderr, flush=True)

    rows = []
    for name in names:
        runs = results[name]
        step = statistics.median(t for r in runs for t in r["step_s"])
        cpu = statistics.median(t for r in runs for t in r["step_cpu_s"])
        peak = statistics.median(r["peak_rss_mb"] for r in runs)
        extra = statistics.median(r["peak_rss_mb"] - r["base_rss_mb"] for r in runs)
        rows.append({"config": name, "what": CONFIGS[name][0], "modules": runs[0]["modules"],
                     "trainable_params": runs[0]["trainable_params"], "step_s": step, "step_cpu_s": cpu,
                     "peak_rss_mb": peak,
                     "peak_over_model_mb": extra})
    ref = next((r for r in rows if r["config"] == "lora_all"), None)
    print(f"\nembedded SmolLM2-135M, batch {a.batch_size} x max_length {a.max_length}, rank {a.rank}, "
          f"gradient checkpointing {'on' if a.gc else 'off'}, {a.threads} threads, "
          f"{a.rounds} rounds x {a.steps} steps (median)\n")
    print("| config | what | modules | trainable | step wall (s) | x LoRA | step CPU (s) | x LoRA "
          "| peak RSS (MB) | over model (MB) | x LoRA |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(r, key):
        return f"{r[key] / ref[key]:.2f}" if ref else "-"

    for r in rows:
        print(f"| {r['config']} | {r['what']} | {r['modules']} | {r['trainable_params']:,} | {r['step_s']:.2f} | "
              f"{ratio(r, 'step_s')} | {r['step_cpu_s']:.2f} | {ratio(r, 'step_cpu_s')} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_over_model_mb']:.0f} | {ratio(r, 'peak_over_model_mb')} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

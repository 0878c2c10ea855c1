"""Run untrusted generated Python (HumanEval completions) in a locked-down child process.

Each program runs in a fresh interpreter, in a throwaway temporary folder, under these layers
(each applied where the host allows it; `ExecResult.isolation` says which were):

- resource limits: CPU seconds, address space, file size, open files, no core dumps, and
  RLIMIT_NPROC = 0 so the program cannot fork or spawn (a fork bomb fails at its first fork);
- a wall-clock timeout, after which the whole process group is killed;
- when running as root: the child drops to `nobody` (root ignores RLIMIT_NPROC, and `nobody`
  cannot write anything root owns);
- a private network namespace (no interfaces but a down loopback); if the host refuses one,
  socket creation is blocked inside the interpreter before the program starts;
- Landlock (Linux >= 5.13): writes only inside the temporary folder, no TCP bind/connect, no
  signals to processes outside the sandbox;
- a clean environment (no API keys, no PYTHON* variables) and `python -I`.

A program passes only if it runs to its end: exiting early with status 0 (`sys.exit(0)`,
`os._exit(0)`) counts as a failure, as the launcher prints a secret marker only after the
program returns.

Code execution is opt-in: callers check `code_exec_allowed(flag)` first (the flag, or the
environment variable HF_ALLOW_CODE_EVAL=1, the convention of Hugging Face's `code_eval`).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from domlora.errors import DomloraError

logger = logging.getLogger(__name__)

ALLOW_ENV = "HF_ALLOW_CODE_EVAL"
NOBODY = 65534


class SandboxError(DomloraError):
    """The sandbox itself cannot run programs on this host (not a failing program)."""


def code_exec_allowed(flag: bool = False) -> bool:
    """True when running generated code was explicitly allowed: `flag`, or HF_ALLOW_CODE_EVAL=1."""
    return bool(flag) or os.environ.get(ALLOW_ENV, "").strip() == "1"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program run."""

    timeout_s: float = 10.0
    """wall-clock seconds before the process group is killed"""
    memory_mb: int = 2048
    """address-space limit (RLIMIT_AS)"""
    file_size_mb: int = 16
    """largest file the program may write, stdout and stderr included (RLIMIT_FSIZE)"""
    open_files: int = 64
    """open file descriptors (RLIMIT_NOFILE)"""
    output_chars: int = 2000
    """how much of the end of stdout / stderr to keep in the result"""

    def __post_init__(self):
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "open_files"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.open_files < 16:
            raise ValueError("open_files must be >= 16 (the interpreter needs a few)")


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program run."""

    status: Literal["passed", "failed", "timeout"]
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: tuple[str, ...] = field(default_factory=tuple)
    reason: str = ""
    """one line on why it did not pass"""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher runs in the child: it reads its settings from stdin, locks itself down, then
# runs program.py. Keep it self-contained (stdlib only) and single-threaded.
_LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.stdin.read())
os.close(0)
os.open(os.devnull, os.O_RDONLY)
done = []
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
if cfg["netns"]:
    if uid == 0:
        ok = libc.unshare(CLONE_NEWNET) == 0
    else:
        ok = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
        if ok:
            try:
                for f, s in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{f}", "w") as fh:
                        fh.write(s)
            except OSError:
                ok = False
    if ok:
        done.append("netns")
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
done.append("rlimits")
if cfg["drop_to"] is not None:
    # become `nobody` but keep CAP_DAC_READ_SEARCH alone, so the interpreter's files stay
    # readable wherever it is installed (e.g. under /root) while nothing root owns is writable
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    caps = (CapData * 2)()
    caps[0].effective = caps[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH
    libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), caps)
    libc.prctl(8, 0, 0, 0, 0)
    done.append("uid:nobody")
abi = cfg["landlock_abi"]
if abi >= 1:
    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
    if abi >= 2:
        fs |= 1 << 13
    if abi >= 3:
        fs |= 1 << 14
    net = 0b11 if abi >= 4 else 0
    scoped = 0b11 if abi >= 6 else 0
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = RulesetAttr(fs, net, scoped)
    rfd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    ok = rfd >= 0
    for path, rights in ((cfg["workdir"], fs), (os.devnull, (1 << 1) | ((1 << 14) if abi >= 3 else 0))):
        if not ok:
            break
        pfd = os.open(path, os.O_PATH)
        rule = PathBeneath(rights, pfd)
        ok = libc.syscall(445, rfd, 1, ctypes.byref(rule), 0) == 0
        os.close(pfd)
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0 and libc.syscall(446, rfd, 0) == 0
    if rfd >= 0:
        os.close(rfd)
    if ok:
        done.append("landlock-fs")
        if net:
            done.append("landlock-net")
        if scoped:
            done.append("landlock-scope")
if "netns" not in done and "landlock-net" not in done:
    import socket, _socket
    def _deny(*a, **k):
        raise PermissionError("network access is disabled in the sandbox")
    for mod in (socket, _socket):
        for attr in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
            if hasattr(mod, attr):
                setattr(mod, attr, _deny)
    done.append("sockets-blocked-in-process")
missing = [layer for layer in cfg["require"] if layer not in done]
if missing:
    sys.stderr.write("sandbox: could not apply " + ", ".join(missing) + "\n")
    os._exit(97)
marker = cfg["marker"]
del cfg
sys.stderr.write("sandbox-layers: " + ",".join(done) + "\n")
sys.stderr.flush()
sys.argv = ["program.py"]
with open("program.py", encoding="utf-8") as fh:
    code = compile(fh.read(), "program.py", "exec")
try:
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
except SystemExit as exc:
    code = exc.code
    if code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program exited before it finished\n")
    sys.stderr.flush()
    os._exit(98)
sys.stdout.flush()
os.write(1, ("\n" + marker + "\n").encode())
os._exit(0)
'''


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when unavailable)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(444, None, ctypes.c_size_t(0), 1)  # LANDLOCK_CREATE_RULESET_VERSION
        return max(int(abi), 0)
    except (OSError, AttributeError):
        return 0


@functools.lru_cache(maxsize=None)
def host_isolation() -> dict:
    """What this host supports: landlock ABI, whether we run as root (then drop to nobody)."""
    return {"platform": sys.platform, "root": os.geteuid() == 0, "landlock_abi": _landlock_abi()}


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    cpu = int(math.ceil(limits.timeout_s)) + 1
    out = {
        "RLIMIT_CPU": cpu,
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_FSIZE": limits.file_size_mb * 1024 * 1024,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": 0,
    }
    return out


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4 * n))
            return fh.read().decode("utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def _signal_reason(rc: int) -> str:
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        return f"killed by signal {-rc}"
    return {"SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded",
            "SIGKILL": "killed", "SIGSEGV": "segmentation fault"}.get(name, f"killed by {name}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_program(source: str, *, limits: SandboxLimits | None = None, python: str | None = None) -> ExecResult:
    """Run `source` as a Python program in the sandbox and report whether it ran to its end.

    Args:
        source: the program text (for HumanEval: prompt + completion + tests + `check(...)`).
        limits: resource limits (default `SandboxLimits()`).
        python: interpreter to use (default: this one).

    Raises:
        SandboxError: not on Linux/macOS-like POSIX, or the child could not be started.
    """
    limits = limits or SandboxLimits()
    if os.name != "posix":
        raise SandboxError("sandboxed code execution needs a POSIX host (Linux); fix: run code tasks on Linux")
    host = host_isolation()
    work = Path(tempfile.mkdtemp(prefix="domlora-sandbox-"))
    drop_to = NOBODY if host["root"] and sys.platform.startswith("linux") else None
    marker = secrets.token_hex(16)
    try:
        os.chmod(work, 0o700)
        (work / "program.py").write_text(source, encoding="utf-8")
        if drop_to is not None:
            os.chown(work, drop_to, drop_to)
            os.chown(work / "program.py", drop_to, drop_to)
        cfg = {"rlimits": _rlimits(limits), "drop_to": drop_to, "landlock_abi": host["landlock_abi"],
               "workdir": str(work), "netns": sys.platform.startswith("linux"), "marker": marker,
               "require": ["rlimits"] + (["uid:nobody"] if drop_to is not None else [])}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = work / ".stdout", work / ".stderr"
        t0 = time.perf_counter()
        with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
            try:
                proc = subprocess.Popen([python or sys.executable, "-I", "-c", _LAUNCHER], cwd=work, env=env,
                                        stdin=subprocess.PIPE, stdout=fo, stderr=fe, start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                raise SandboxError(f"cannot start the sandboxed interpreter: {exc}") from exc
            timed_out = False
            try:
                proc.stdin.write(json.dumps(cfg).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)  # still unreaped, so its pid (= its group id) cannot have been reused
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(out_path, limits.output_chars + len(marker) + 2)
        stderr_full = _tail(err_path, limits.output_chars + 200)
        isolation: tuple[str, ...] = ()
        lines = []
        for line in stderr_full.splitlines():
            if line.startswith("sandbox-layers: "):
                isolation = tuple(x for x in line[len("sandbox-layers: "):].split(",") if x)
            else:
                lines.append(line)
        stderr = "\n".join(lines)[-limits.output_chars:]
        rc = proc.returncode
        finished = stdout.rstrip().endswith(marker)
        stdout = stdout.replace(f"\n{marker}\n", "")[-limits.output_chars:]
        if timed_out:
            return ExecResult("timeout", rc, seconds, stdout, stderr, isolation,
                              f"timed out after {limits.timeout_s:g} s")
        if rc == 0 and finished:
            return ExecResult("passed", rc, seconds, stdout, stderr, isolation)
        if rc == 97:
            raise SandboxError(f"the sandbox could not lock the child down: {stderr.strip()[-300:]}")
        if rc is not None and rc < 0:
            reason = _signal_reason(rc)
        elif rc == 98 or (rc == 0 and not finished):
            reason = "the program exited before it finished"
        else:
            last = [ln for ln in stderr.splitlines() if ln.strip()]
            reason = last[-1][:300] if last else f"exit status {rc}"
        return ExecResult("failed", rc, seconds, stdout, stderr, isolation, reason)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(sources: Sequence[str], *, limits: SandboxLimits | None = None, workers: int = 2,
                 on_done: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
    """Run many programs, `workers` at a time; results come back in input order."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    results: list[ExecResult | None] = [None] * len(sources)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, src, limits=limits): i for i, src in enumerate(sources)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def self_test() -> tuple[str, ...]:
    """Run a trivial program once; return the isolation layers applied, or raise SandboxError."""
    res = run_program("print('ok')\n", limits=SandboxLimits(timeout_s=30.0))
    if not res.passed:
        raise SandboxError(f"the sandbox cannot run even a trivial program on this host ({res.reason}; "
                           f"stderr: {res.stderr.strip()[-300:]!r}); fix: check that the Python interpreter "
                           f"{sys.executable} is readable by every user, or run without code tasks")
    return res.isolation

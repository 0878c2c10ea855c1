"""Run untrusted generated Python (HumanEval completions) in a locked-down child process.

Each program runs in a fresh interpreter, in a throwaway temporary folder, under these layers
(each applied where the host allows it; `ExecResult.isolation` says which were):

- resource limits: CPU seconds, address space, file size, open files, no core dumps, and
  RLIMIT_NPROC = 0 so the program cannot fork or spawn (a fork bomb fails at its first fork);
- a wall-clock timeout, after which the whole process group is killed;
- when running as root: the child drops to `nobody` with no capability left (root ignores
  RLIMIT_NPROC; `nobody` cannot write anything root owns, nor read what is not world-readable);
  a folder above the interpreter that `nobody` cannot enter (a venv or pyenv under /root) is
  covered, in a private mount namespace, by an empty tmpfs into which only the interpreter's
  folders are bound (`mountns`), so the interpreter loads at its usual paths without a capability;
- a private network namespace (no interfaces but a down loopback); if the host refuses one,
  socket creation is blocked inside the interpreter before the program starts;
- Landlock (Linux >= 5.13): reads only of the interpreter's installation (`sys.prefix`,
  `sys.base_prefix`, the folders of the shared libraries it has loaded), the system library
  folders, a few system files (`SYSTEM_READS`) and the temporary folder (`read:landlock`); writes
  only inside the temporary folder; no TCP bind/connect; no signals to processes outside;
- a clean environment (no API keys, no PYTHON* variables) and `python -I`.

Reads are always confined (`ExecResult.reads`): by Landlock, or without it by running as `nobody`
(`read:nobody`: world-readable files stay readable). Where neither is possible (no Landlock and not
root), or the interpreter is unreadable to `nobody`, programs are refused with the reason and the
fix, unless broad reads are accepted explicitly (`allow_broad_reads`, or
DOMLORA_SANDBOX_BROAD_READS=1), which changes nothing where reads can be confined: only where the
interpreter is unreadable without it does the child keep CAP_DAC_READ_SEARCH
(`cap:dac-read-search`), and without Landlock as a non-root user reads are `read:unconfined`;
`preflight` returns the warning eval.json then carries. The child always sets no_new_privs.

A program passes only if it runs to its end: exiting early with status 0 (`sys.exit(0)`,
`os._exit(0)`) counts as a failure, as the launcher prints a secret marker only after the
program returns. A failing program's `reason` is its exception's type and the start of the
message on one line (`REASON_CHARS`); nothing else the program prints is kept beyond the
`stdout`/`stderr` tails of the `ExecResult`.

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
import re
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
BROAD_READS_ENV = "DOMLORA_SANDBOX_BROAD_READS"
NOBODY = 65534
REASON_CHARS = 160
"""longest `ExecResult.reason`: the exception type and the start of its message, one line"""
# system files and folders the interpreter may read besides its own installation: the dynamic
# linker's cache, system library folders (extension modules load libssl, libffi, ... from there),
# time zones and locales, /dev/urandom
SYSTEM_READS = ("/etc/ld.so.cache", "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom")
READ_LAYERS = ("read:landlock", "read:nobody", "read:unconfined")
BROAD_READS_FIX = (f"or accept that generated code may read whatever the evaluating user can: "
                   f"{BROAD_READS_ENV}=1 (eval.json then carries a warning)")


class SandboxError(DomloraError):
    """The sandbox itself cannot run programs on this host (not a failing program)."""


def broad_reads_allowed(flag: bool = False) -> bool:
    """True when broad reads were explicitly accepted: `flag`, or DOMLORA_SANDBOX_BROAD_READS=1."""
    return bool(flag) or os.environ.get(BROAD_READS_ENV, "").strip() == "1"


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
    """why it did not pass: the exception's type and the start of its message (one line, at most
    REASON_CHARS), a signal, a timeout or an exit status; never other output of the program"""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reads(self) -> str:
        """the read confinement that applied: `read:landlock` (only the interpreter's installation,
        system libraries and the work folder), `read:nobody` (what `nobody` may read), or
        `read:unconfined` (accepted explicitly); "" if the child did not start"""
        return next((x for x in self.isolation if x in READ_LAYERS), "")


# The launcher runs in the child: it reads its settings from stdin, locks itself down, then
# runs program.py. Keep it self-contained (stdlib only) and single-threaded.
_LAUNCHER = r'''
import ctypes, json, os, resource, site, sys
cfg = json.loads(sys.stdin.read())
os.close(0)
os.open(os.devnull, os.O_RDONLY)
os.umask(0o022)
done = []
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
drop_to = cfg["drop_to"]
def fail(code, msg):
    sys.stderr.write("sandbox: " + msg + "\n")
    sys.stderr.flush()
    os._exit(code)
CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWNS = 0x40000000, 0x10000000, 0x00020000
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
# what the child may read: this interpreter's installation, the shared libraries it has loaded (and
# the system library folders, for extension modules imported later), a few system files
real = os.path.realpath
reads = {real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
exe = real(sys.executable)
with open("/proc/self/maps") as fh:
    mapped = {parts[5].strip() for parts in (line.split(None, 5) for line in fh) if len(parts) == 6}
for f in mapped:
    f = real(f) if f.startswith("/") else ""
    if f and f != exe and os.path.isfile(f):  # regular files only: no /dev/zero
        reads.add(os.path.dirname(f))
reads = sorted(p for p in reads | {real(p) for p in cfg["system_reads"] if os.path.exists(p)} | {exe}
               if p not in ("", "/"))
workdir = real(cfg["workdir"])
# as root, in a private mount namespace: a folder `nobody` cannot enter above the interpreter
# (e.g. /root for a venv or pyenv there) is covered by an empty tmpfs into which only the
# interpreter's folders (and the work folder) are bound, so they stay reachable at the same paths
# without any capability, and the rest of that folder is not even there (its folders are 0711:
# passable, not listable)
def blocked_top(p):
    parts = p.strip("/").split("/")[:-1]
    for i in range(len(parts)):
        d = "/" + "/".join(parts[:i + 1])
        st = os.stat(d)
        if not (st.st_mode & 0o001 or (st.st_uid == drop_to and st.st_mode & 0o100)
                or (st.st_gid == drop_to and st.st_mode & 0o010)):
            return d
    return None
mount_error = None
if drop_to is not None and cfg["mountns"]:
    groups = {}
    for p in reads + [workdir]:
        top = blocked_top(p)
        if top is not None:
            groups.setdefault(top, []).append(p)
    if groups:
        MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
        mount = lambda src, dst, fstype, flags, data: libc.mount(
            src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
            data and data.encode()) == 0
        ok = libc.unshare(CLONE_NEWNS) == 0 and mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        for top, paths in sorted(groups.items()):
            if not ok:
                break
            keep = []
            for p in sorted(paths, key=len):
                if not any(p.startswith(q + "/") for q in keep):
                    keep.append(p)
            fds = [(p, os.open(p, os.O_PATH)) for p in keep]
            ok = mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=711,size=64k")
            for p, fd in fds:
                if ok:
                    if os.path.isdir(f"/proc/self/fd/{fd}"):
                        os.makedirs(p, 0o711, exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(p), 0o711, exist_ok=True)
                        open(p, "a").close()
                    ok = mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC, None)
                os.close(fd)
        if ok:
            done.append("mountns")
        else:  # e.g. a container without CAP_SYS_ADMIN: the check below says whether it mattered
            mount_error = os.strerror(ctypes.get_errno()) or "failed"
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
done.append("rlimits")
def unreadable():
    """None if the interpreter can read its standard library and site-packages, else the error"""
    for d in [os.path.dirname(os.__file__)] + [p for p in site.getsitepackages() if os.path.isdir(p)]:
        try:
            os.listdir(d)
            if d == os.path.dirname(os.__file__):
                open(os.__file__, "rb").close()
        except OSError as exc:
            return exc
    return None
def unreadable_fail(exc):
    fail(96, f"the interpreter's files are unreadable to the sandboxed child: {exc}"
         + (f" (the mount namespace that exposes them could not be set up: {mount_error})" if mount_error else ""))
if drop_to is not None:
    broad = cfg["broad_reads"]
    if broad:  # keep CAP_DAC_READ_SEARCH in the permitted set, to use it below only if needed
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
    os.setgroups([])
    os.setgid(drop_to)
    os.setuid(drop_to)  # without PR_SET_KEEPCAPS this clears every capability
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    def set_dac_read_search(on):
        caps = (CapData * 2)()
        caps[0].effective = caps[0].permitted = (1 << 2) if on else 0  # CAP_DAC_READ_SEARCH
        return libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), caps) == 0
    if broad:
        libc.prctl(8, 0, 0, 0, 0)
        problem = unreadable()
        # explicitly accepted, and only where the interpreter is unreadable without it: keep
        # CAP_DAC_READ_SEARCH alone (what Landlock does not confine is then readable too)
        if problem is not None and set_dac_read_search(True):
            done.append("cap:dac-read-search")
        elif not set_dac_read_search(False):
            fail(97, "could not drop CAP_DAC_READ_SEARCH")
    done.append("uid:nobody")
problem = unreadable()
if problem is not None:
    unreadable_fail(problem)
if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: no set-uid program can give anything back
    done.append("no-new-privs")
abi = cfg["landlock_abi"]
if abi >= 1:
    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14
    read_dir = EXECUTE | READ_FILE | READ_DIR
    fs = read_dir | WRITE_FILE | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
    if abi >= 2:
        fs |= 1 << 13
    if abi >= 3:
        fs |= TRUNCATE
    net = 0b11 if abi >= 4 else 0
    scoped = 0b11 if abi >= 6 else 0
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = RulesetAttr(fs, net, scoped)
    rfd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    ok = rfd >= 0
    rules = [(workdir, fs), (os.devnull, READ_FILE | WRITE_FILE | (TRUNCATE if abi >= 3 else 0))]
    rules += [(p, read_dir if os.path.isdir(p) else EXECUTE | READ_FILE) for p in reads]
    for path, rights in rules:
        if not ok:
            break
        try:
            pfd = os.open(path, os.O_PATH)
        except OSError:
            continue  # unreachable even before Landlock: the check below names it if it matters
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
if "landlock-fs" in done:
    done.append("read:landlock")
elif "uid:nobody" in done and "cap:dac-read-search" not in done:
    done.append("read:nobody")
else:
    done.append("read:unconfined")
problem = unreadable()  # still, under Landlock
if problem is not None:
    unreadable_fail(problem)
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
if "read:unconfined" in done and not cfg["broad_reads"]:
    missing.append("read confinement")
if missing:
    fail(97, "could not apply " + ", ".join(missing))
marker = cfg["marker"]
del cfg
sys.stderr.write("sandbox-layers: " + ",".join(done) + "\n")
sys.stderr.flush()
sys.argv = ["program.py"]
try:
    with open("program.py", encoding="utf-8") as fh:
        code = compile(fh.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
except SystemExit as exc:
    code = exc.code
    if code not in (None, 0):
        raise
    sys.stderr.write("sandbox: the program exited before it finished\n")
    sys.stderr.flush()
    os._exit(98)
except BaseException as exc:
    # the traceback as usual, then the reason on a last line of its own, tagged with the marker
    try:
        import traceback
        sys.stdout.flush()
        traceback.print_exc()
        msg = str(exc)[:300].replace("\n", " ")
        sys.stderr.write("\n" + marker + " reason: " + type(exc).__name__ + ": " + msg + "\n")
        sys.stderr.flush()
    finally:
        os._exit(1)
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


def _one_line(text: str) -> str:
    """`Type: message` as one printable line of at most REASON_CHARS (`Type` alone if no message)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split()).removesuffix(":")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def exception_reason(stderr: str, rc: int | None) -> str:
    """The exception in a traceback that ends stderr, as `Type: message` on one line (at most
    REASON_CHARS); `exit status N` otherwise (nothing else the program wrote is kept)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if lines and "Traceback (most recent call last):" in stderr:
        m = re.match(r"([A-Za-z_][\w.]*)(?::\s*(.*))?$", lines[-1].strip())
        if m:
            return _one_line(f"{m.group(1)}: {m.group(2) or ''}")
    return f"exit status {rc}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_program(source: str, *, limits: SandboxLimits | None = None, python: str | None = None,
                allow_broad_reads: bool = False, landlock_abi: int | None = None) -> ExecResult:
    """Run `source` as a Python program in the sandbox and report whether it ran to its end.

    Args:
        source: the program text (for HumanEval: prompt + completion + tests + `check(...)`).
        limits: resource limits (default `SandboxLimits()`).
        python: interpreter to use (default: this one).
        allow_broad_reads: run even where reads cannot be confined (or DOMLORA_SANDBOX_BROAD_READS=1).
        landlock_abi: the Landlock ABI to use (default: the kernel's; 0 = as if the kernel had none).

    Raises:
        SandboxError: not on a POSIX host, the child could not be started or locked down, or reads
            cannot be confined here and broad reads were not accepted.
    """
    limits = limits or SandboxLimits()
    if os.name != "posix":
        raise SandboxError("sandboxed code execution needs a POSIX host (Linux); fix: run code tasks on Linux")
    host = host_isolation()
    abi = host["landlock_abi"] if landlock_abi is None else int(landlock_abi)
    broad = broad_reads_allowed(allow_broad_reads)
    linux = sys.platform.startswith("linux")
    if not broad and abi < 1 and not (host["root"] and linux):
        raise SandboxError(
            "generated code would be able to read every file the evaluating user can (API tokens, "
            "credentials): this kernel has no Landlock (Linux >= 5.13 with landlock among its LSMs) and "
            "the evaluation does not run as root, so the child cannot drop to `nobody`; fix: evaluate on "
            "a kernel with Landlock, or as root with the interpreter readable by `nobody`, " + BROAD_READS_FIX)
    work = Path(tempfile.mkdtemp(prefix="domlora-sandbox-"))
    drop_to = NOBODY if host["root"] and linux else None
    marker = secrets.token_hex(16)
    try:
        os.chmod(work, 0o700)
        (work / "program.py").write_text(source, encoding="utf-8")
        if drop_to is not None:
            os.chown(work, drop_to, drop_to)
            os.chown(work / "program.py", drop_to, drop_to)
        cfg = {"rlimits": _rlimits(limits), "drop_to": drop_to, "landlock_abi": abi, "workdir": str(work),
               "netns": linux, "mountns": linux, "system_reads": SYSTEM_READS, "broad_reads": broad,
               "marker": marker, "require": ["rlimits"] + (["uid:nobody"] if drop_to is not None else [])}
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
        stderr_full = _tail(err_path, limits.output_chars + 600)  # + the layers and reason lines
        isolation: tuple[str, ...] | None = None
        lines, raised = [], None
        for line in stderr_full.splitlines():
            if line.startswith("sandbox-layers: ") and isolation is None:  # the launcher's, before the program ran
                isolation = tuple(x for x in line[len("sandbox-layers: "):].split(",") if x)
            elif line.startswith(f"{marker} reason: "):
                raised = line[len(marker) + 9:]
            elif line:
                lines.append(line)
        isolation = isolation or ()
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
            raise SandboxError(f"the sandbox could not lock the child down: {stderr.strip()[-300:]}; fix: "
                               f"evaluate on Linux with Landlock (>= 5.13), or as root, " + BROAD_READS_FIX)
        if rc == 96:
            exe = python or sys.executable
            raise SandboxError(
                f"{stderr.strip()[-400:]}; the sandboxed child runs as `nobody` without any capability; fix: "
                f"let every user reach and read the installation of {exe} (o+x on the folders above it, "
                f"chmod -R o+rX on it), install Python where they can, " + BROAD_READS_FIX)
        if rc is not None and rc < 0:
            reason = _signal_reason(rc)
        elif rc == 98 or (rc == 0 and not finished):
            reason = "the program exited before it finished"
        elif raised is not None:
            reason = _one_line(raised)
        else:
            reason = exception_reason(stderr, rc)
        return ExecResult("failed", rc, seconds, stdout, stderr, isolation, reason)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(sources: Sequence[str], *, limits: SandboxLimits | None = None, workers: int = 2,
                 on_done: Callable[[int, ExecResult], None] | None = None, **kwargs) -> list[ExecResult]:
    """Run many programs, `workers` at a time; results come back in input order (kwargs: `run_program`'s)."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    results: list[ExecResult | None] = [None] * len(sources)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, src, limits=limits, **kwargs): i for i, src in enumerate(sources)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def self_test(allow_broad_reads: bool = False) -> tuple[str, ...]:
    """Run a trivial program once; return the isolation layers applied, or raise SandboxError."""
    res = run_program("print('ok')\n", limits=SandboxLimits(timeout_s=30.0), allow_broad_reads=allow_broad_reads)
    if not res.passed:
        raise SandboxError(f"the sandbox cannot run even a trivial program on this host ({res.reason}; "
                           f"stderr: {res.stderr.strip()[-300:]!r}); fix: check that the Python interpreter "
                           f"{sys.executable} is readable by every user, or run without code tasks")
    return res.isolation


def preflight(allow_broad_reads: bool = False) -> str | None:
    """Before an evaluation runs generated code: check that the sandbox works here with its reads
    confined, or that broad reads were accepted explicitly.

    Returns:
        None, or (broad reads accepted and in effect) the warning to record in eval.json.

    Raises:
        SandboxError: programs cannot run here, or only with broad reads that were not accepted;
            the message names what is missing and the fix.
    """
    layers = self_test(broad_reads_allowed(allow_broad_reads))
    if "read:unconfined" in layers:
        return (f"generated code ran with unconfined reads ({BROAD_READS_ENV}=1): it could read every file "
                f"the evaluating user can; sandbox layers: {', '.join(layers)}")
    if "cap:dac-read-search" in layers:
        return (f"generated code ran with CAP_DAC_READ_SEARCH ({BROAD_READS_ENV}=1): Landlock confines its "
                f"reads to the interpreter's installation and system libraries, but within those it reads "
                f"any file; sandbox layers: {', '.join(layers)}")
    return None

"""The code-execution sandbox: programs pass or fail for the right reasons and cannot harm the host."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import pytest

from domlora.evaluate import sandbox
from domlora.evaluate.sandbox import (REASON_CHARS, ExecResult, SandboxError, SandboxLimits, code_exec_allowed,
                                      exception_reason, host_isolation, preflight, run_program, run_programs,
                                      self_test)
from domlora.evaluate.scoring import build_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

FAST = SandboxLimits(timeout_s=5.0)


def test_passing_and_failing_programs():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('done')\n", limits=FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    assert "done" in ok.stdout
    assert "rlimits" in ok.isolation
    bad = run_program("assert 1 + 1 == 3, 'arithmetic'\n", limits=FAST)
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError" in bad.reason
    syntax = run_program("def f(:\n", limits=FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_times_out_and_the_run_goes_on():
    t0 = time.perf_counter()
    res = run_program("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1.5))
    took = time.perf_counter() - t0
    assert res.status == "timeout" and not res.passed
    assert took < 10, took
    assert run_program("print(1)\n", limits=FAST).passed  # the sandbox still works afterwards


def test_sleeping_program_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    res = run_program("import time\ntime.sleep(60)\n", limits=SandboxLimits(timeout_s=1.0))
    assert res.status == "timeout"
    assert time.perf_counter() - t0 < 10


def test_fork_bomb_fails_at_its_first_fork():
    # bounded (at most 2**8 processes) in case the limit ever stopped working
    src = "import os\nfor _ in range(8):\n    os.fork()\nprint('forked')\n"
    t0 = time.perf_counter()
    res = run_program(src, limits=FAST)
    assert res.status == "failed", res
    assert "BlockingIOError" in res.reason or "Resource temporarily unavailable" in res.reason
    assert "forked" not in res.stdout
    assert time.perf_counter() - t0 < 10


def test_subprocesses_cannot_be_spawned():
    res = run_program("import subprocess\nsubprocess.run(['true'], check=True)\n", limits=FAST)
    assert res.status == "failed"


def test_file_write_outside_its_temp_dir_fails(tmp_path):
    target = tmp_path / "escape.txt"
    os.chmod(tmp_path, 0o777)  # even a folder everyone may write to stays closed
    res = run_program(f"open({str(target)!r}, 'w').write('pwned')\n", limits=FAST)
    assert res.status == "failed"
    assert not target.exists()
    # deleting files outside is refused as well
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    os.chmod(keep, 0o666)
    res = run_program(f"import os\nos.remove({str(keep)!r})\n", limits=FAST)
    assert res.status == "failed" and keep.exists()


def test_writes_inside_its_temp_dir_work_and_vanish():
    res = run_program("import os\nopen('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
                      "print(os.getcwd())\n", limits=FAST)
    assert res.passed, res
    workdir = res.stdout.strip().splitlines()[0]
    assert not os.path.exists(workdir)  # the temporary folder is removed afterwards


def test_socket_connect_fails_and_reaches_nobody():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(1)
                conn.close()
            except (socket.timeout, OSError):
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        res = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                          "s.sendall(b'hello')\n", limits=FAST)
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(2)
        server.close()
    assert res.status == "failed"
    assert hits == []


def test_exiting_early_with_status_zero_is_not_a_pass():
    for src in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n"):
        res = run_program(src, limits=FAST)
        assert res.status == "failed", src
        assert "exited before it finished" in res.reason


def test_memory_and_output_are_capped():
    mem = run_program("x = bytearray(8 * 1024 ** 3)\n", limits=SandboxLimits(timeout_s=5.0, memory_mb=512))
    assert mem.status == "failed" and "MemoryError" in mem.reason
    flood = run_program("while True:\n    print('x' * 4096)\n", limits=SandboxLimits(timeout_s=5.0, file_size_mb=1))
    assert flood.status in ("failed", "timeout")
    assert len(flood.stdout) <= FAST.output_chars


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("DOMLORA_JUDGE_API_KEY", "sk-secret-should-not-leak")
    res = run_program("import os\nassert not any('secret' in v for v in os.environ.values())\n"
                      "assert 'DOMLORA_JUDGE_API_KEY' not in os.environ\n", limits=FAST)
    assert res.passed, res


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: the child must drop to nobody")
def test_root_drops_to_nobody():
    res = run_program("import os\nprint(os.getuid(), os.geteuid())\n", limits=FAST)
    assert res.passed and res.stdout.split()[:2] == ["65534", "65534"]
    assert "uid:nobody" in res.isolation


def test_network_isolation_layer_is_reported():
    layers = self_test()
    assert "rlimits" in layers
    assert any(x in layers for x in ("netns", "landlock-net", "sockets-blocked-in-process"))
    if host_isolation()["landlock_abi"] >= 1:
        assert "landlock-fs" in layers


def test_run_programs_keeps_order():
    srcs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    seen = []
    res = run_programs(srcs, limits=FAST, workers=2, on_done=lambda i, r: seen.append(i))
    assert [r.passed for r in res] == [i % 2 == 0 for i in range(6)]
    assert sorted(seen) == list(range(6))
    assert all(isinstance(r, ExecResult) for r in res)


def test_code_exec_allowed(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    assert not code_exec_allowed(False)
    assert code_exec_allowed(True)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert code_exec_allowed(False)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    assert not code_exec_allowed(False)


@pytest.mark.parametrize("kw", [{"timeout_s": 0}, {"timeout_s": float("inf")}, {"memory_mb": 0},
                                {"open_files": 4}])
def test_bad_limits(kw):
    with pytest.raises(ValueError):
        SandboxLimits(**kw)


# ------------------------------------------------------------------------------------------
# reads: only the interpreter's installation, system libraries and the program's own folder
# ------------------------------------------------------------------------------------------

ROOT = os.geteuid() == 0
LANDLOCK = host_isolation()["landlock_abi"] >= 1
confined = pytest.mark.skipif(not (ROOT or LANDLOCK), reason="reads can be confined only as root or with Landlock")
root_only = pytest.mark.skipif(not ROOT, reason="root only: the child drops to nobody")

HUMANEVAL_DOC = {  # HumanEval/0 with its canonical solution
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    \"\"\"Check if in given list of numbers, are any two numbers closer to each other than\n"
              "    given threshold.\"\"\"\n",
    "entry_point": "has_close_elements",
    "test": "def check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n",
}
CANONICAL = ("    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n"
             "            if idx != idx2:\n                distance = abs(elem - elem2)\n"
             "                if distance < threshold:\n                    return True\n\n    return False\n")
IMPORTS = ("import collections, datetime, decimal, fractions, hashlib, heapq, itertools, json, math, random, re, "
           "statistics, string, tempfile, zoneinfo\n"
           "assert json.loads(json.dumps({'a': [1]})) == {'a': [1]} and math.gcd(12, 18) == 6\n"
           "assert len(hashlib.sha256(random.randbytes(8)).hexdigest()) == 64\n"
           "assert str(decimal.Decimal(1) / 8) == '0.125' and datetime.date(2024, 2, 29).isoformat()\n"
           "with tempfile.TemporaryDirectory() as d:\n    open(d + '/x', 'w').write('x')\n")


@pytest.fixture()
def secrets_outside(tmp_path_factory):
    """A root-owned 0600 file and a world-readable file in a folder everyone may enter, and a file in
    the home of the user running the tests (all removed afterwards)."""
    d = tempfile.mkdtemp(prefix="domlora-test-secrets-")
    os.chmod(d, 0o755)
    private, public = os.path.join(d, "token"), os.path.join(d, "public.txt")
    for path, mode, text in ((private, 0o600, "PRIVATE-TOKEN-123"), (public, 0o644, "PUBLIC-TEXT-456")):
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, mode)
    home = os.path.expanduser("~")
    home_file = os.path.join(home, f".domlora-test-secret-{os.getpid()}")
    with open(home_file, "w") as fh:
        fh.write("HOME-SECRET-789")
    try:
        yield {"private": private, "public": public, "home": home, "home_file": home_file}
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(home_file)


def _attacks(paths: dict) -> dict[str, str]:
    return {
        "root-owned 0600 file": f"print(open({paths['private']!r}).read())\n",
        "/etc/shadow": "print(open('/etc/shadow').read())\n",
        "a file in $HOME": f"print(open({paths['home_file']!r}).read())\n",
        "listing /root": "import os\nprint(os.listdir('/root'))\n",
        "listing $HOME": f"import os\nprint(os.listdir({paths['home']!r}))\n",
    }


def _assert_attacks_fail(paths: dict, **kw):
    for name, src in _attacks(paths).items():
        res = run_program(src, limits=FAST, **kw)
        assert res.status == "failed", (name, res)
        assert res.reason.split(":")[0] in ("PermissionError", "FileNotFoundError"), (name, res.reason)
        for text in (res.stdout, res.stderr, res.reason):
            assert "SECRET" not in text and "TOKEN" not in text and "root:" not in text, (name, text)


def _assert_normal_programs_pass(**kw) -> ExecResult:
    ok = run_program(build_program(HUMANEVAL_DOC, CANONICAL), limits=FAST, **kw)
    assert ok.passed, ok
    wrong = run_program(build_program(HUMANEVAL_DOC, "    return False\n"), limits=FAST, **kw)
    assert wrong.status == "failed" and wrong.reason.startswith("AssertionError"), wrong
    imports = run_program(IMPORTS, limits=FAST, **kw)
    assert imports.passed, imports
    return ok


@confined
def test_reads_outside_the_installation_fail(secrets_outside):
    _assert_attacks_fail(secrets_outside)
    res = _assert_normal_programs_pass()
    assert res.reads == ("read:landlock" if LANDLOCK else "read:nobody"), res.isolation
    # accepting broad reads changes nothing where they are not needed
    _assert_attacks_fail(secrets_outside, allow_broad_reads=True)
    res = run_program("print(1)\n", limits=FAST, allow_broad_reads=True)
    assert res.passed and "cap:dac-read-search" not in res.isolation and res.reads != "read:unconfined", res
    if LANDLOCK:  # world-readable is not enough
        for path in (secrets_outside["public"], "/etc/passwd", "/proc/1/cmdline"):
            res = run_program(f"print(open({path!r}).read())\n", limits=FAST)
            assert res.status == "failed" and "PermissionError" in res.reason, (path, res)


@confined
def test_installed_packages_import():
    # numpy comes with the stack (torch needs it); its compiled modules load their own shared libraries
    res = run_program("import numpy as np\nassert int(np.arange(5).sum()) == 10\n", limits=SandboxLimits(timeout_s=20.0))
    assert res.passed, res


@root_only
def test_the_child_holds_no_capability():
    src = ("import ctypes\nclass H(ctypes.Structure):\n    _fields_ = [('v', ctypes.c_uint32), ('p', ctypes.c_int)]\n"
           "class D(ctypes.Structure):\n    _fields_ = [('e', ctypes.c_uint32), ('p', ctypes.c_uint32), ('i', ctypes.c_uint32)]\n"
           "d = (D * 2)()\nassert ctypes.CDLL(None).capget(ctypes.byref(H(0x20080522, 0)), d) == 0\n"
           "print(d[0].e, d[0].p, d[1].e, d[1].p)\n")
    res = run_program(src, limits=FAST)
    assert res.passed and res.stdout.split() == ["0", "0", "0", "0"], res


@pytest.fixture(scope="module")
def root_only_python(tmp_path_factory):
    """An interpreter living under a root-only (0700) folder: a copy of the base installation's
    interpreter and standard library, and a venv (`--copies`) made from it with one installed package."""
    if not ROOT:
        pytest.skip("root only")
    top = tempfile.mkdtemp(prefix="domlora-test-rootonly-")  # 0700, root's
    base = os.path.join(top, "base")
    stdlib = sysconfig.get_paths()["stdlib"]
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    skip = shutil.ignore_patterns("site-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip",
                                  "config-*", "lib2to3", "pydoc_data")
    shutil.copytree(stdlib, os.path.join(base, "lib", ver), ignore=skip, symlinks=True)
    os.makedirs(os.path.join(base, "bin"))
    exe = os.path.join(base, "bin", ver)
    shutil.copy2(os.path.realpath(sys._base_executable), exe)
    venv = os.path.join(top, "venv")
    subprocess.run([exe, "-m", "venv", "--copies", "--without-pip", venv], check=True, timeout=120)
    site = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.join(site, "tinypkg"))
    with open(os.path.join(site, "tinypkg", "__init__.py"), "w") as fh:
        fh.write("VALUE = 42\n")
    try:
        yield {"top": top, "python": os.path.join(venv, "bin", "python"), "stdlib": os.path.join(base, "lib", ver)}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _where(python: str) -> list[str]:
    res = run_program("import os, sys, tinypkg\nassert tinypkg.VALUE == 42\n"
                      "print(os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), os.path.realpath(os.__file__))\n",
                      limits=FAST, python=python)
    assert res.passed, res
    return res.stdout.split()


@pytest.mark.parametrize("abi", [None, 0], ids=["landlock", "no-landlock"])
def test_interpreter_under_a_root_only_folder(root_only_python, secrets_outside, abi):
    top, python = root_only_python["top"], root_only_python["python"]
    assert os.stat(top).st_uid == 0 and os.stat(top).st_mode & 0o077 == 0  # really root-only
    kw = {"python": python, "landlock_abi": abi}
    # the child really runs the interpreter, the standard library and the packages from there
    assert all(p.startswith(top + "/") for p in _where(python)), _where(python)
    res = _assert_normal_programs_pass(**kw)
    assert "mountns" in res.isolation and "cap:dac-read-search" not in res.isolation
    assert res.reads == ("read:landlock" if abi is None and LANDLOCK else "read:nobody"), res.isolation
    _assert_attacks_fail(secrets_outside, **kw)
    # nothing else of the root-only folder shows
    res = run_program(f"import os\nprint(os.listdir({top!r}))\n", limits=FAST, **kw)
    assert res.status == "failed" or "base" not in res.stdout, res


@pytest.mark.parametrize("abi", [None, 0], ids=["landlock", "no-landlock"])
def test_interpreter_unreadable_to_nobody_is_refused(root_only_python, abi):
    python, stdlib = root_only_python["python"], root_only_python["stdlib"]
    os.chmod(stdlib, 0o700)
    try:
        with pytest.raises(SandboxError, match="unreadable") as err:
            run_program("print(1)\n", limits=FAST, python=python, landlock_abi=abi)
        assert "fix:" in str(err.value) and "DOMLORA_SANDBOX_BROAD_READS=1" in str(err.value)
        # the explicit opt-in runs it, keeping the one capability, and says so
        res = run_program("print(1)\n", limits=FAST, python=python, landlock_abi=abi, allow_broad_reads=True)
        assert res.passed and "cap:dac-read-search" in res.isolation, res
        assert res.reads == ("read:landlock" if abi is None and LANDLOCK else "read:unconfined"), res.isolation
    finally:
        os.chmod(stdlib, 0o755)


def test_no_landlock_and_not_root_is_refused_before_running(monkeypatch):
    monkeypatch.setattr(sandbox, "host_isolation", lambda: {"platform": sys.platform, "root": False, "landlock_abi": 0})
    monkeypatch.delenv(sandbox.BROAD_READS_ENV, raising=False)
    with pytest.raises(SandboxError, match="no Landlock") as err:
        run_program("print(1)\n", limits=FAST, landlock_abi=0)
    assert "fix:" in str(err.value) and "DOMLORA_SANDBOX_BROAD_READS=1" in str(err.value)


def test_preflight_warns_only_for_broad_reads(monkeypatch):
    monkeypatch.setattr(sandbox, "self_test", lambda broad=False: ("rlimits", "landlock-fs", "read:landlock"))
    assert preflight() is None
    monkeypatch.setattr(sandbox, "self_test", lambda broad=False: ("rlimits", "uid:nobody", "read:unconfined"))
    assert "unconfined reads" in preflight(True)

    def refuse(broad=False):
        raise SandboxError("no Landlock; fix: ...")

    monkeypatch.setattr(sandbox, "self_test", refuse)
    with pytest.raises(SandboxError):
        preflight()


def test_reason_is_the_exception_on_one_bounded_line():
    res = run_program("raise ValueError('first line\\n' + 'x' * 5000)\n", limits=FAST)
    assert res.status == "failed" and res.reason == "ValueError: first line " + "x" * (REASON_CHARS - 26) + "..."
    assert run_program("def f(:\n", limits=FAST).reason.startswith("SyntaxError: ")
    assert run_program("class E(Exception):\n    pass\nraise E()\n", limits=FAST).reason == "E"
    # what a program writes to stderr itself is not kept as its reason
    res = run_program("import sys\nsys.stderr.write('SECRET-VALUE\\n')\nsys.exit(3)\n", limits=FAST)
    assert res.reason == "exit status 3"
    res = run_program("import sys\nsys.exit('SECRET-VALUE')\n", limits=FAST)
    assert res.reason == "exit status 1"
    assert exception_reason("Traceback (most recent call last):\n  File 'x'\nKeyError: 'a\\tb'\n", 1) == "KeyError: 'a\\tb'"
    assert exception_reason("Traceback (most recent call last):\n  File 'x'\nStopIteration\n", 1) == "StopIteration"
    assert exception_reason("", 2) == "exit status 2"


def test_evaluate_refuses_before_the_model_loads_or_records_the_warning(monkeypatch, tmp_path):
    import torch

    from domlora.evaluate import run

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    def refuse():
        raise SandboxError("reads cannot be confined here; fix: ...")

    monkeypatch.setattr(run, "load_for_eval", no_model)
    monkeypatch.setattr(run, "sandbox_preflight", refuse)
    out = tmp_path / "eval.json"
    with pytest.raises(SandboxError, match="cannot be confined"):
        run.evaluate(model="embedded", adapter=None, tasks="humaneval_sandbox", out=out, allow_code_exec=True)
    # with broad reads accepted, the warning lands in eval.json
    monkeypatch.setattr(run, "sandbox_preflight", lambda: "generated code ran with unconfined reads")
    monkeypatch.setattr(run, "load_for_eval", lambda *a, **k: type("L", (), {"model": torch.nn.Linear(1, 1)})())
    monkeypatch.setattr(run, "make_lm", lambda *a, **k: None)
    monkeypatch.setattr(run, "_run_task", lambda *a, **k: {"status": "success", "metrics": {}})
    doc = run.evaluate(model="embedded", adapter=None, tasks="humaneval_sandbox", out=out, allow_code_exec=True)
    assert doc["warnings"] == ["generated code ran with unconfined reads"]
    assert json.loads(out.read_text())["warnings"] == doc["warnings"]

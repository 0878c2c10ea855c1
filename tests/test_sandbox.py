"""The code-execution sandbox: programs pass or fail for the right reasons and cannot harm the host."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest

from domlora.evaluate.sandbox import (ExecResult, SandboxLimits, code_exec_allowed, host_isolation, run_program, run_programs,
                             self_test)

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

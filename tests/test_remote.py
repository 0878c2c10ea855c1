"""Hosts share stage results through a DVC remote (run-cache entries + objects): a stage computed on one
clone is restored, never recomputed, on another; a half push never counts; a remote that does not answer
is waited for, then reported; a fresh clone rebuilds the same dvc.lock with plain `dvc repro --pull`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from domlora.errors import ConfigError
from domlora.pipeline.orchestrate import StageFailed, StageRef, run_stage
from domlora.pipeline.remote import Remote, RemoteUnavailable, publish, require_remote, restore

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).with_name("dvc"))
ENV = os.environ | {"DVC_NO_ANALYTICS": "1"}

STAGE = '''
import os, sys, pathlib, json, yaml
name = sys.argv[1]
if os.environ.get("BREAK_REMOTE"):  # the remote goes away while this stage computes
    r = pathlib.Path(os.environ["BREAK_REMOTE"])
    r.rename(r.with_name("remote.away"))
    r.write_text("gone")
p = yaml.safe_load(open("params.yaml"))
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path(f"out/{name}.json").write_text(json.dumps({"name": name, "v": p["v"]}))
'''
TOTAL = '''
import json, pathlib
t = sum(json.loads(pathlib.Path(f"out/{n}.json").read_text())["v"] for n in ("a", "b"))
pathlib.Path("total.json").write_text(json.dumps({"total": t}))
'''
DVC_YAML = """stages:
  work:
    foreach: [a, b, c]
    do:
      cmd: python -m stages.work ${item}
      deps: [stages/work.py]
      params: [v]
      outs:
        - out/${item}.json
  total:
    cmd: python -m stages.total
    deps: [stages/total.py, out/a.json, out/b.json]
    outs: [total.json]
"""


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def origin(tmp_path):
    o = tmp_path / "origin"
    (o / "stages").mkdir(parents=True)
    _git(o, "init", "-q")
    subprocess.run([DVC, "init", "-q"], cwd=o, check=True, env=ENV)
    (o / "stages" / "__init__.py").write_text("")
    (o / "stages" / "work.py").write_text(STAGE)
    (o / "stages" / "total.py").write_text(TOTAL)
    (o / "params.yaml").write_text("v: 1\n")
    (o / "dvc.yaml").write_text(DVC_YAML)
    _git(o, "add", "-A")
    _git(o, "commit", "-qm", "init")
    (tmp_path / "remote").mkdir()
    return o


def _host(origin: Path, name: str, remote_dir: Path | None) -> Path:
    h = origin.parent / name
    _git(origin.parent, "clone", "-q", str(origin), str(h))
    if remote_dir is not None:
        subprocess.run([DVC, "remote", "add", "--local", "-d", "store", str(remote_dir)], cwd=h, check=True,
                       env=ENV, capture_output=True)
    return h


def _refs(root: Path) -> dict[str, StageRef]:
    from domlora.pipeline.orchestrate import dvc_stages

    return {s.name: s for s in dvc_stages(root)}


def _lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_computed_once_restored_elsewhere_and_one_record(origin):
    remote_dir = origin.parent / "remote"
    a, b = _host(origin, "host_a", remote_dir), _host(origin, "host_b", remote_dir)
    remote = require_remote(a, wait_s=10)
    refs = _refs(a)
    assert run_stage(a, refs["work@a"], remote=remote) == "computed"
    assert run_stage(b, refs["work@a"], remote=remote) == "restored"  # never computed twice
    assert not (b / ".domlora_logs").exists()
    assert json.loads((b / "out" / "a.json").read_text()) == {"name": "a", "v": 1}
    assert _lock(b)["work@a"] == _lock(a)["work@a"]
    # a stage whose input is nowhere is refused, naming it
    with pytest.raises(StageFailed, match="needs work@b"):
        run_stage(b, refs["total"], remote=remote, needs=["work@a", "work@b"])
    assert run_stage(a, refs["work@b"], remote=remote) == "computed"
    assert run_stage(b, refs["total"], remote=remote, needs=["work@a", "work@b"]) == "computed"
    assert json.loads((b / "total.json").read_text()) == {"total": 2}
    # a third host restores the whole record from the remote, computing nothing
    c = _host(origin, "host_c", remote_dir)
    got = restore(c, ["work@a", "work@b", "total"], remote=remote)
    assert got.outcomes == {"work@a": "restored", "work@b": "restored", "total": "restored"}
    assert got.bytes > 0
    assert _lock(c) == _lock(b)
    # and so does plain DVC on a fresh clone: `dvc repro --pull` restores from the run-cache
    d = _host(origin, "host_d", remote_dir)
    out = subprocess.run([DVC, "repro", "--pull", "total"], cwd=d, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout and "is cached" in out.stdout
    assert _lock(d) == _lock(b)
    # a changed parameter is a different stage: nothing to restore, it is computed
    (c / "params.yaml").write_text("v: 5\n")
    assert run_stage(c, refs["work@a"], remote=remote) == "computed"
    assert restore(a, ["work@a"], remote=remote).outcomes == {"work@a": "current"}


def test_a_half_push_is_not_done(origin):
    remote_dir = origin.parent / "remote"
    a, b = _host(origin, "host_a", remote_dir), _host(origin, "host_b", remote_dir)
    remote = require_remote(a, wait_s=5)
    assert run_stage(a, _refs(a)["work@a"], remote=remote) == "computed"
    entries = [p for p in (remote_dir / "runs").rglob("*") if p.is_file()]
    objects = [p for p in (remote_dir / "files").rglob("*") if p.is_file()]
    assert len(entries) == 1 and len(objects) == 1
    # the objects arrived but the entry did not: not done
    saved = entries[0].read_bytes()
    entries[0].unlink()
    assert restore(b, ["work@a"], remote=remote).outcomes == {"work@a": "missing"}
    # the entry arrived but an object it names did not: not done either
    entries[0].write_bytes(saved)
    obj = objects[0].read_bytes()
    objects[0].unlink()
    assert restore(b, ["work@a"], remote=remote).outcomes == {"work@a": "missing"}
    objects[0].write_bytes(obj)
    assert restore(b, ["work@a"], remote=remote).outcomes == {"work@a": "restored"}


def _break(remote_dir: Path) -> Path:
    """The remote stops answering: its folder is replaced by a file (unreachable for root too)."""
    away = remote_dir.with_name("remote.away")
    remote_dir.rename(away)
    remote_dir.write_text("gone")
    return away


def _mend(remote_dir: Path, away: Path) -> None:
    remote_dir.unlink()
    away.rename(remote_dir)


def test_remote_down_waits_then_fails_clearly_and_pushes_later(origin):
    remote_dir = origin.parent / "remote"
    a, b = _host(origin, "host_a", remote_dir), _host(origin, "host_b", remote_dir)
    remote = require_remote(a, wait_s=3)
    refs = _refs(a)
    # the remote goes away while the stage computes: the push waits, then fails naming the remote
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=r"pushing work@c: the DVC remote 'store' .* did not answer for 3 s"):
        run_stage(a, refs["work@c"], remote=remote, env={"BREAK_REMOTE": str(remote_dir)})
    assert time.monotonic() - t0 >= 2.5
    _mend(remote_dir, remote_dir.with_name("remote.away"))
    # the remote never got it: another host sees it missing
    assert restore(b, ["work@c"], remote=remote).outcomes == {"work@c": "missing"}
    # this host has it recorded: the next run pushes it without computing it again
    assert restore(a, ["work@c"], remote=remote, check_remote=True).outcomes == {"work@c": "local"}
    log = a / ".domlora_logs" / "work__c.log"
    mtime = log.stat().st_mtime
    assert run_stage(a, refs["work@c"], remote=remote) == "skipped"
    assert log.stat().st_mtime == mtime
    assert restore(b, ["work@c"], remote=remote).outcomes == {"work@c": "restored"}


def test_remote_back_within_the_wait(origin):
    remote_dir = origin.parent / "remote"
    a = _host(origin, "host_a", remote_dir)
    remote = Remote("store", str(remote_dir), wait_s=30)
    away = _break(remote_dir)
    threading.Timer(3.0, _mend, args=(remote_dir, away)).start()
    t0 = time.monotonic()
    assert run_stage(a, _refs(a)["work@a"], remote=remote) == "computed"  # restore waited, then all went on
    assert time.monotonic() - t0 >= 2.5
    assert any((remote_dir / "runs").rglob("*"))


def test_no_remote_is_a_clear_error(origin):
    a = _host(origin, "host_a", None)
    with pytest.raises(ConfigError, match="no default DVC remote .*`dvc remote add -d store"):
        require_remote(a)


def test_a_moved_remote_folder_is_not_filled_on_the_local_disk(origin):
    remote_dir = origin.parent / "remote"
    a = _host(origin, "host_a", remote_dir)
    shutil.rmtree(remote_dir)  # e.g. a share that is not mounted
    with pytest.raises(RemoteUnavailable, match="is not there"):
        restore(a, ["work@a"], remote=Remote("store", str(remote_dir), wait_s=1))
    assert not remote_dir.exists()

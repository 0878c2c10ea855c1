"""Stages computed side by side and recorded in DVC without tripping over its repository lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from domlora.pipeline.orchestrate import StageFailed, StageRef, is_up_to_date, run_stage

pytestmark = pytest.mark.slow

STAGE = '''
import sys, time, pathlib, json, yaml
name = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))
if p["fail"] == name:
    raise SystemExit("boom in " + name)
time.sleep(1.0)
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path(f"out/{name}.json").write_text(json.dumps({"name": name, "v": p["v"]}))
'''


@pytest.fixture
def repo(tmp_path):
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "work.py").write_text(STAGE)
    (tmp_path / "params.yaml").write_text("v: 1\nfail: none\nnames: [a, b, c]\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  work:\n    foreach: ${names}\n    do:\n      cmd: python -m stages.work ${item} --no-progress\n"
        "      deps:\n        - stages/work.py\n      params:\n        - v\n        - fail\n"
        "      outs:\n        - out/${item}.json\n")
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=tmp_path, check=True)
    return tmp_path


def _ref(name):
    return StageRef(f"work@{name}", f"python -m stages.work {name} --no-progress")


def test_two_stages_side_by_side_then_nothing_recomputed(repo):
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, run_stage(repo, _ref(n))))
               for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == {"a": "computed", "b": "computed"}
    lock = (repo / "dvc.lock").read_text()
    assert "work@a" in lock and "work@b" in lock
    assert is_up_to_date(repo, "work@a") and is_up_to_date(repo, "work@b")
    assert not is_up_to_date(repo, "work@c")
    # a rerun recomputes nothing
    assert run_stage(repo, _ref("a")) == "skipped"
    # a changed param reruns it
    (repo / "params.yaml").write_text("v: 2\nfail: none\nnames: [a, b, c]\n")
    assert run_stage(repo, _ref("a")) == "computed"
    assert json.loads((repo / "out" / "a.json").read_text())["v"] == 2


def test_a_failing_stage_does_not_stop_the_other(repo):
    (repo / "params.yaml").write_text("v: 1\nfail: b\nnames: [a, b, c]\n")
    errors = {}

    def go(n):
        try:
            run_stage(repo, _ref(n))
        except StageFailed as exc:
            errors[n] = str(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b", "c")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(errors) == {"b"} and "boom in b" in errors["b"]
    assert is_up_to_date(repo, "work@a") and is_up_to_date(repo, "work@c")

"""What `dvc status` reruns after an edit, on a copy of this repository's code and dvc.yaml: editing a report
renderer reruns the report and not training; editing the tokeniser reruns probe, train and evaluate.

The copy records its stages as computed (`dvc commit` over placeholder inputs and outputs, no model runs),
then asks DVC itself which are stale."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")
pytestmark = pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed beside this interpreter")


def _dvc(repo: Path, *args: str) -> str:
    proc = subprocess.run([str(DVC), *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the code, dvc.yaml, grid.yaml and params.yaml, one cell's stages recorded as up to date."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("cache") / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("domlora", "stages"):
        shutil.copytree(ROOT / d, repo / d, ignore=ignore)
    for f in ("dvc.yaml", "grid.yaml", "params.yaml"):
        shutil.copy(ROOT / f, repo / f)
    grid = yaml.safe_load((ROOT / "grid.yaml").read_text())
    cell, c = next(iter(grid["cells"].items()))
    probe = next(k for k, v in grid["probes"].items() if (v["model"], v["dataset"]) == (c["model"], c["dataset"]))
    stages = {"probe": f"probe@{probe}", "train": f"train@{cell}", "evaluate": f"evaluate@{cell}", "report": "report"}
    _dvc(repo, "init", "--no-scm", "-q")
    with contextlib.chdir(repo), Repo(str(repo)) as r:
        for name in stages.values():
            [stage] = r.stage.collect(name)
            for x in stage.deps + stage.outs:  # placeholders: what DVC hashes, not what a stage would write
                p = Path(x.fs_path)
                if p.exists():
                    continue
                if p.suffix:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_text("{}\n")
                else:
                    p.mkdir(parents=True, exist_ok=True)
                    (p / "placeholder.txt").write_text("x\n")
        for name in stages.values():
            r.commit(name, force=True)
    return repo, stages


def _stale(repo: Path, stages: dict[str, str]) -> set[str]:
    doc = json.loads(_dvc(repo, "status", "--json", *stages.values()) or "{}")
    return {kind for kind, name in stages.items() if name in doc}


def _edit(path: Path):
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    return lambda: path.write_text(original)


def test_recorded_stages_are_up_to_date(repo):
    root, stages = repo
    assert _stale(root, stages) == set()


def test_editing_a_report_renderer_reruns_the_report_not_training(repo):
    root, stages = repo
    undo = _edit(root / "domlora" / "pipeline" / "sparse_b_report.py")
    try:
        assert _stale(root, stages) == {"report"}
    finally:
        undo()


def test_editing_the_tokeniser_reruns_probe_train_and_evaluate(repo):
    root, stages = repo
    undo = _edit(root / "domlora" / "samples.py")
    try:
        assert {"probe", "train", "evaluate"} <= _stale(root, stages)
    finally:
        undo()
    assert _stale(root, stages) == set()

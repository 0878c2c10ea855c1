"""The Prefect flow runs a grid with 2 cells side by side, records it in DVC, tracks it in MLflow,
and a rerun recomputes nothing (a tiny random model stands in for the backbone)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

PARAMS = """
profiles:
  tiny: &tiny
    profile: tiny
    seed_data: 7
    models:
      toy: {{id: {model}, dtype: float32}}
    datasets:
      arith: {{source: arith, n_train: 16, n_probe: 4, n_eval: 3, tasks: [arith]}}
    probe: {{samples: 4, max_length: 512, alpha: 16, rank: 8, batch_size: 2, nfn: true, reuse_from: null}}
    methods:
      lora: {{placement: all, tables: [1, 10]}}
      domlora: {{placement: dom, lr: 1.0e-3, tables: [1, 10]}}
      broken: {{placement: plop, k: 9, tables: [5]}}
    train: {{rank: 4, alpha: 8, lr: 1.0e-3, max_steps: 2, batch_size: 2, grad_accum: 1, max_length: 512,
            gradient_checkpointing: false, save_every: 0}}
    eval: {{limit: 2, batch_size: 2, max_gen_toks: 4, allow_code_exec: false}}
    tracking: {{enabled: true, uri: "sqlite:///{root}/mlflow.db", experiment: flowtest}}
    grid:
      models: [toy]
      probe_datasets: [arith]
      datasets: [arith]
      methods: [lora, domlora, broken]
      seeds: [0]
run: *tiny
"""


@pytest.fixture
def repo(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    model_dir = tmp_path / "toy_model"
    make_tiny_llama(len(tiny_tokenizer), layers=3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    r = tmp_path / "repo"
    r.mkdir()
    for item in ("dvc.yaml", "stages", "domlora"):
        src = ROOT / item
        (shutil.copytree(src, r / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, r / item))
    (r / "params.yaml").write_text(PARAMS.format(model=model_dir, root=r))
    from domlora.pipeline.grid import write_grid
    from domlora.pipeline.params import load_params

    write_grid(load_params(r / "params.yaml"), r)
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run(["git", "init", "-q"], cwd=r, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=r, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=r, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=r, check=True)
    return r


def test_flow_runs_cells_side_by_side_and_reruns_nothing(repo, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT))
    from flows.domlora_flow import domlora

    monkeypatch.chdir(repo)
    with prefect_test_harness(server_startup_timeout=90):
        state = domlora(root=str(repo), return_state=True)
        summary = state.result(raise_on_failure=False) if state.is_completed() else state.data
        # the broken cell fails (PLoP with k = 9 of 7 module types, found when its placement is selected),
        # the two good ones finish, the report is written
        assert state.is_failed() and "toy-arith-broken-0" in state.message
        lock = (repo / "dvc.lock").read_text()
        for cell in ("toy-arith-lora-0", "toy-arith-domlora-0"):
            assert f"train@{cell}" in lock and f"evaluate@{cell}" in lock
            assert (repo / "runs" / cell / "adapter").is_dir()
            assert json.loads((repo / "runs" / cell / "train_metrics.json").read_text())["status"] == "success"
        assert "train@toy-arith-broken-0" not in lock
        report = (repo / "reports" / "README.md").read_text()
        assert "toy-arith-broken-0" in report and "missing" in report
        mtimes = {p: p.stat().st_mtime for p in (repo / "runs").rglob("*.json")}
        # rerun: only the broken cell is retried; nothing already in DVC is recomputed
        state2 = domlora(root=str(repo), methods=["lora", "domlora"], return_state=True)
        assert state2.is_completed(), state2.message
        assert {p: p.stat().st_mtime for p in mtimes if "base" not in str(p)} == \
               {p: t for p, t in mtimes.items() if "base" not in str(p)}
    # MLflow: one parent per grid execution with a child per finished cell
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("flowtest")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`domlora.kind` = 'grid'")
    assert len(parents) >= 1
    children = client.search_runs([exp.experiment_id], filter_string="tags.`domlora.kind` = 'cell'")
    by_cell = {r.data.tags["domlora.cell_id"]: r for r in children}
    assert {"toy-arith-lora-0", "toy-arith-domlora-0"} <= set(by_cell)
    assert by_cell["toy-arith-broken-0"].data.tags.get("domlora.status") == "failed"

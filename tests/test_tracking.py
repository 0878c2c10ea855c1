"""MLflow tracking: explicit parents across threads and processes, no loss when the store is down."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from domlora.pipeline.params import Cell, load_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.tracking import PENDING, MlflowTracker, NullTracker, make_tracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml", profile="ci")


def _fake_cell(layout: Layout, params, cell: Cell, *, loss=(2.0, 1.5, 1.0)):
    d = layout.run_dir(cell)
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    (d / "train_metrics.json").write_text(json.dumps({
        "status": "success", "trainable_params": 1234, "total_params": 99999, "wall_time_s": 1.5,
        "loss_curve": [{"step": i + 1, "loss": v} for i, v in enumerate(loss)]}))
    (d / "scores.json").write_text(json.dumps({"arith/exact_match": 0.25, "arith/exact_match_stderr": 0.1}))
    pl = layout.placement(cell.model, cell.dataset, cell.method)
    pl.parent.mkdir(parents=True, exist_ok=True)
    pl.write_text(json.dumps({"strategy": "dom", "modules": ["model.layers.11.mlp.down_proj"]}))


def _tracker(tmp_path, grid_id="g1"):
    return MlflowTracker(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t", grid_id=grid_id,
                         profile="ci", params_hash="abc")


@pytest.mark.slow
def test_one_parent_one_child_per_cell_across_threads(tmp_path, params):
    layout = Layout(tmp_path)
    cells = params.cells()
    for c in cells:
        _fake_cell(layout, params, c)
    tr = _tracker(tmp_path)
    parent = tr.parent_run_id()
    threads = [threading.Thread(target=lambda c=c: _tracker(tmp_path).log_cell(cell=c, params=params, layout=layout,
                                                                                 stage="train")) for c in cells]
    [t.start() for t in threads]
    [t.join() for t in threads]
    runs = tr.client.search_runs([tr._exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["domlora.cell_id"] for r in runs) == sorted(c.id for c in cells)
    r = runs[0]
    assert r.data.params["r"] == "8" and r.data.params["trainable_params"] == "1234"
    assert "model.layers.11.mlp.down_proj" in r.data.params["target_modules"]
    hist = tr.client.get_metric_history(r.info.run_id, "train/loss")
    assert [m.step for m in hist] == [1, 2, 3]
    assert r.data.metrics["eval/arith/exact_match"] == 0.25
    # the same grid id from another process finds the same parent (no new one)
    code = (f"from domlora.pipeline.tracking import MlflowTracker; t=MlflowTracker(uri='sqlite:///{tmp_path}/mlflow.db', "
            "experiment='t', grid_id='g1', profile='ci', params_hash='abc'); print(t.parent_run_id())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == parent
    # logging a cell twice adds no second child
    tr.log_cell(cell=cells[0], params=params, layout=layout, stage="evaluate")
    assert len(tr.client.search_runs([tr._exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")) == len(cells)
    # an evaluated cell's run is finished; the parent stays open until the report's tables are logged
    assert {r.info.status for r in tr.client.search_runs([tr._exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")} == {"FINISHED"}
    assert tr.client.get_run(parent).info.status == "RUNNING"
    tr.log_tables({"table1": [{"method": "lora", "avg": 25.0}]})
    assert tr.client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_store_down_loses_nothing_and_sync_recovers(tmp_path, params, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    layout = Layout(tmp_path)
    cell = params.cells()[0]
    _fake_cell(layout, params, cell)
    bad = MlflowTracker(uri="http://127.0.0.1:9/", experiment="t", grid_id="g2", profile="ci", params_hash="x")
    bad.log_cell(cell=cell, params=params, layout=layout, stage="train")  # must not raise
    assert (layout.run_dir(cell) / PENDING).exists()
    assert (layout.train_metrics(cell)).exists()
    good = _tracker(tmp_path, "g2")
    good.log_cell(cell=cell, params=params, layout=layout, stage="train")
    assert not (layout.run_dir(cell) / PENDING).exists()


def test_secrets_never_logged(tmp_path, params, monkeypatch):
    from domlora.pipeline.tracking import _scrub

    assert _scrub({"judge_api_key": "sk-1", "lr": 1}) == {"lr": 1}


def test_null_tracker_when_disabled(params, monkeypatch):
    monkeypatch.setenv("DOMLORA_TRACKING", "off")
    assert isinstance(make_tracker(params), NullTracker)

"""MLflow tracking: explicit parents across threads and processes, no loss when the store is down."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from domlora.pipeline.params import Cell, load_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.tracking import PENDING, MlflowTracker, NullTracker, make_tracker, record_params
from domlora.train.config import TrainConfig, TrainRecord

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml", profile="ci")


def _fake_cell(layout: Layout, params, cell: Cell, *, loss=(2.0, 1.5, 1.0)):
    d = layout.run_dir(cell)
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    cfg = params.train_config(cell.method, seed=cell.seed)
    TrainRecord(config=dataclasses.asdict(cfg), model={"id": "embedded"}, status="success",
                placement={"strategy": "dom", "modules": ["model.layers.11.mlp.down_proj"]}, trainable_params=1234,
                total_params=99999, wall_time_s=1.5, loss=list(loss)).write(d / "train_metrics.json")
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
    assert r.data.params["rank"] == "8" and r.data.params["trainable_params"] == "1234"
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


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_logged_params_are_every_field_of_the_resolved_config(profile):
    """For every method: the params logged from a record are its TrainConfig field by field, and its
    study sections (`grpo.*`, `sparse_b.*`) as written in params.yaml."""
    p = load_params(ROOT / "params.yaml", profile=profile)
    for name, m in p.methods.items():
        cfg = p.train_config(name, seed=0)
        study = {k: dataclasses.asdict(v) for k, v in (("grpo", m.grpo), ("sparse_b", m.sparse_b)) if v is not None}
        logged = record_params(TrainRecord(config=dataclasses.asdict(cfg), model={"id": "m"}, placement={},
                                           study=study))
        for f in dataclasses.fields(TrainConfig):
            assert logged[f.name] == getattr(cfg, f.name), (name, f.name)
        for section, values in study.items():
            for k, v in values.items():
                assert logged[f"{section}.{k}"] == v, (name, section, k)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_every_method_logs_the_config_its_trainer_ran(tmp_path, profile, tiny_checkpoint):
    """params.yaml -> train stage -> trainer (SFT, sparse-B, GRPO) -> record -> MLflow, for every method of the
    profile on a tiny model: the MLflow params are the config the trainer wrote that it used (a GRPO cell
    logs the rank it trained at)."""
    import yaml

    from domlora.data import prepare_dataset
    from domlora.modules import find_candidates
    from domlora.models import load_model
    from domlora.pipeline.params import parse_profile
    from domlora.pipeline.stages.train import train_stage

    d = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"][profile]
    model = next(iter(d["models"]))
    d["models"] = {model: {"id": str(tiny_checkpoint), "dtype": "float32"}}
    d["datasets"] = {"arith": {"source": "arith", "n_train": 8, "n_probe": 2, "n_eval": 4, "tasks": ["arith"]}}
    d["train"].update(max_steps=1, batch_size=1, grad_accum=1, max_length=320, deepspeed=None,
                      gradient_checkpointing=False, save_every=0)
    d["grid"] = {"models": [model], "datasets": ["arith"], "methods": list(d["methods"]), "seeds": [0]}
    for m in d["methods"].values():
        m.pop("models", None)
        m.pop("layers", None) if isinstance(m.get("layers"), dict) else None
        if m.get("layers"):
            m["layers"] = [1]  # the tiny model has 3 layers
        m.pop("max_steps", None)  # one step each (GRPO methods set their own)
        if "sparse_b" in m:
            m["sparse_b"]["k"] = 40
        if "grpo" in m:
            m["grpo"] = {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 4, "n_eval": 2,
                         "eval_max_new_tokens": 4}
    d["probe"]["reuse_from"] = None
    d.pop("checkpoints", None)
    params = parse_profile(d, name=profile)
    layout = Layout(tmp_path)
    prepare_dataset("arith", layout.data_dir("arith"), n_train=8, n_probe=2, n_eval=4, seed=0)
    names = [c.name for c in find_candidates(load_model(str(tiny_checkpoint)).model)]
    tracker = _tracker(tmp_path, grid_id=profile)
    for cell in params.cells():
        m = params.methods[cell.method]
        modules = names if m.placement in ("all", "plop", "types") else [n for n in names if n.endswith("1.mlp.down_proj")]
        out = layout.placement(cell.model, cell.dataset, cell.method)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"strategy": m.placement, "modules": modules}))
        train_stage(params, cell, layout=layout, tracker=tracker)
        rec = TrainRecord.read(layout.train_metrics(cell))
        assert rec.config == dataclasses.asdict(params.train_config(cell.method, seed=cell.seed)), cell.method
        run = tracker.client.get_run(tracker.cell_run_id(cell.id))
        for key, value in record_params(rec).items():
            assert run.data.params[key] == str(value)[:6000], (cell.method, key)
        if m.grpo is not None:
            assert run.data.params["rank"] == str(params.train_config(cell.method).rank) == "8"


@pytest.mark.parametrize("name,secret", [("api_key", True), ("judge.api_key", True), ("HF_TOKEN", True),
                                         ("mlflow_tracking_token", True), ("password", True), ("apikey", True),
                                         ("grpo.eval_max_new_tokens", False), ("tokens_per_s", False),
                                         ("max_gen_toks", False), ("rank", False), ("monkey_rate", False)])
def test_a_secret_param_is_never_logged_and_a_token_count_is(name, secret):
    from domlora.pipeline.tracking import _scrub

    assert (name not in _scrub({name: 1})) is secret

"""DVC and Python expand the grid the same way: stage names and templated paths agree."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from domlora.pipeline.params import load_params
from domlora.pipeline.paths import Layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dvc_stages():
    from dvc.repo import Repo

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with Repo(str(ROOT)) as repo:
            return {s.addressing: s for s in repo.index.stages}
    finally:
        os.chdir(old)


def _outs(stage) -> set[str]:
    return {str(Path(o.def_path)) for o in stage.outs}


def test_stage_names_match_cells(dvc_stages):
    p = load_params(ROOT / "params.yaml")
    assert {n for n in dvc_stages if n.startswith("train@")} == {f"train@{c.id}" for c in p.cells()}
    assert {n for n in dvc_stages if n.startswith("evaluate@")} == {f"evaluate@{c.id}" for c in p.cells()}
    assert {n for n in dvc_stages if n.startswith("probe@")} == {
        f"probe@{m}-{d}" for m in p.grid.models for d in p.grid.probe_datasets}
    assert {n for n in dvc_stages if n.startswith("select@")} == {
        f"select@{c.model}-{c.dataset}-{c.method}" for c in p.cells() if c.seed == p.grid.seeds[0]}


def test_templated_outs_match_layout(dvc_stages):
    p = load_params(ROOT / "params.yaml")
    lay = Layout(Path("."))
    for c in p.cells():
        assert str(lay.adapter(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert str(lay.train_metrics(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert str(lay.loss_csv(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert {str(lay.eval_json(c)), str(lay.scores_json(c))} <= _outs(dvc_stages[f"evaluate@{c.id}"])
        assert str(lay.placement(c.model, c.dataset, c.method)) in _outs(dvc_stages[f"select@{c.model}-{c.dataset}-{c.method}"])
    for m in p.grid.models:
        for d in p.grid.probe_datasets:
            assert str(lay.page_json(m, d)) in _outs(dvc_stages[f"probe@{m}-{d}"])
        for d in p.grid.datasets:
            assert str(lay.scores_json(lay.base_id(m, d))) in _outs(dvc_stages[f"evaluate_base@{m}-{d}"])


def test_flow_and_dvc_stage_names_agree():
    """The Prefect tasks address the same DVC stages the matrix creates."""
    import ast

    src = (ROOT / "flows" / "domlora_flow.py").read_text()
    names = {n.value.split("@")[0] for n in ast.walk(ast.parse(src))
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and "@" in n.value}
    fstrings = {v.split("@")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.JoinedStr)
                for v in [ast.unparse(n)[2:]] if "@" in v}
    assert {"prepare_data", "probe", "select", "train", "evaluate", "evaluate_base"} <= names | fstrings


def test_metrics_are_the_scores(dvc_stages):
    """`dvc metrics show` lists scores (and the report's summary), not configs or data statistics."""
    metrics = {str(Path(o.def_path)) for s in dvc_stages.values() for o in s.outs if o.metric}
    assert metrics, "no metrics declared"
    assert all(m.endswith("scores.json") or m == "reports/metrics.json" for m in metrics), metrics


def test_plots_template_resolves_like_dvc():
    """DVC reads plots.html_template relative to .dvc/; a path that misses is taken as the template text."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    tpl = (ROOT / ".dvc" / cfg["plots"]["html_template"]).resolve()
    assert tpl.is_file(), tpl
    text = tpl.read_text(encoding="utf8")
    assert "{plot_divs}" in text and "cdn.jsdelivr" not in text

"""DVC, Python and the Prefect flow see one grid: stage names, templated paths and commands agree."""
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
        f"probe@{m}-{d}" for m in p.grid.probe_models for d in p.grid.probe_datasets}
    assert {n for n in dvc_stages if n.startswith("select@")} == {
        f"select@{c.model}-{c.dataset}-{c.method}" for c in p.cells() if c.seed == p.grid.seeds[0]}


def test_grid_file_is_current():
    """The committed grid.yaml is the one params.yaml gives (else every stage refuses to run)."""
    from domlora.pipeline.grid import check_grid

    check_grid(load_params(ROOT / "params.yaml"), ROOT)


def test_grid_skips_cells_of_methods_restricted_to_other_models(tmp_path):
    """A method restricted to some models has no cells (and so no DVC stages) on the others."""
    import yaml

    from domlora.pipeline.grid import grid_doc
    from domlora.pipeline.params import parse_profile

    d = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["paper"]
    p = parse_profile(d, name="paper")
    doc = grid_doc(p)
    assert "qwen3_8b-tulu-domlora-0" in doc["cells"] and "llama31_8b-tulu-domlora-0" in doc["cells"]
    restricted = [m for m in p.grid.methods if p.methods[m].models]
    assert restricted, "the paper profile restricts its LLaMA-only tables to LLaMA"
    for m in restricted:
        assert not any(c["method"] == m and c["model"] not in p.methods[m].models for c in doc["cells"].values())


def test_templated_outs_match_layout(dvc_stages):
    p = load_params(ROOT / "params.yaml")
    lay = Layout(Path("."))
    for c in p.cells():
        assert str(lay.adapter(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert str(lay.train_metrics(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert str(lay.loss_csv(c)) in _outs(dvc_stages[f"train@{c.id}"])
        assert {str(lay.eval_json(c)), str(lay.scores_json(c))} <= _outs(dvc_stages[f"evaluate@{c.id}"])
        assert str(lay.placement(c.model, c.dataset, c.method)) in _outs(dvc_stages[f"select@{c.model}-{c.dataset}-{c.method}"])
    for m in p.grid.probe_models:
        for d in p.grid.probe_datasets:
            assert str(lay.page_json(m, d)) in _outs(dvc_stages[f"probe@{m}-{d}"])
    for m in p.grid.models:
        for d in p.grid.datasets:
            assert str(lay.scores_json(lay.base_id(m, d))) in _outs(dvc_stages[f"evaluate_base@{m}-{d}"])


def test_flow_runs_exactly_dvcs_stages_and_commands(dvc_stages):
    """The flow's stage list and commands come from DVC's index: the whole grid reaches every stage of
    dvc.yaml, with the very command DVC runs, upstream stages first."""
    pytest.importorskip("prefect")
    from flows.domlora_flow import grid_targets

    from domlora.pipeline.orchestrate import dvc_stages as flow_stages
    from domlora.pipeline.orchestrate import with_upstream

    p = load_params(ROOT / "params.yaml")
    every = flow_stages(ROOT)
    refs = with_upstream(every, grid_targets(p)) + [next(r for r in every if r.name == "report")]
    assert {r.name: r.cmd for r in refs} == {n: s.cmd for n, s in dvc_stages.items()}
    seen: set[str] = set()
    for r in refs:  # in the flow's order every stage comes after what it reads
        assert set(r.upstream) <= seen, r.name
        seen.add(r.name)
    for c in p.cells():
        assert dvc_stages[f"train@{c.id}"].cmd == f"python -m stages.train --cell {c.id} --no-progress"
        assert f"select@{c.model}-{c.dataset}-{c.method}" in next(r for r in refs if r.name == f"train@{c.id}").upstream
    # a subset (one paper table) runs only what its cells need, and the report
    sub = with_upstream(every, grid_targets(p, methods=[p.grid.methods[0]]))
    assert {r.name for r in sub} < {r.name for r in refs}
    assert not any(r.name.endswith(f"-{p.grid.methods[1]}-0") for r in sub)


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

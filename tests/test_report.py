"""The report: paper-layout tables for the cells present; missing and failed cells marked, never a crash."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domlora.pipeline.params import load_params
from domlora.pipeline.paths import Layout
from domlora.train.config import TrainRecord
from domlora.pipeline.report import primary_metric, write_report

ROOT = Path(__file__).resolve().parents[1]


def _page_doc(dom_layer: int, argmax: str, n_layers: int = 4) -> dict:
    mods = {}
    for layer in range(n_layers):
        for t in ("q_proj", "v_proj", "down_proj"):
            name = f"model.layers.{layer}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}"
            page = 10.0 if (t == "down_proj" and layer == dom_layer) else 1.0 + layer * 0.1
            if name == argmax:
                page = 20.0
            mods[name] = {"type": t, "layer": layer, "d_in": 8, "d_out": 8, "S": page, "PAGE": page}
    total = sum(m["PAGE"] for m in mods.values())
    for m in mods.values():
        m["share_total"] = m["PAGE"] / total
        m["share_type"] = 0.5
    dom = f"model.layers.{dom_layer}.mlp.down_proj"
    top = sorted(mods, key=lambda n: -mods[n]["PAGE"])
    return {"model": "embedded", "dominant": dom, "argmax": top[0], "dominant_share_total": mods[dom]["share_total"],
            "dominant_share_type": 0.5, "top_k": [{"name": n} for n in top[:10]], "modules": mods}


@pytest.fixture
def grid(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="ci")
    lay = Layout(tmp_path)
    for d, argmax in (("arith", "model.layers.1.mlp.down_proj"), ("humaneval", "model.layers.2.self_attn.v_proj")):
        pd = lay.probe_dir("smol", d)
        pd.mkdir(parents=True)
        (pd / "page.json").write_text(json.dumps(_page_doc(1, argmax)))
    lora, dom = params.cells()
    # lora: trained and evaluated; domlora: training failed
    lay.run_dir(lora).mkdir(parents=True)
    TrainRecord(config={}, model={"id": "embedded"}, placement={}, status="success", trainable_params=4_883_456,
                loss=[2.0, 1.0], step_time_s=[1.0, 3.0], wall_time_s=9.0).write(lay.train_metrics(lora))
    lay.scores_json(lora).write_text(json.dumps({"arith/exact_match": 0.25}))
    lay.eval_json(lora).write_text(json.dumps({"tasks": {"arith": {"status": "success", "metrics": {
        "exact_match": {"value": 0.25, "stderr": 0.0559, "n": 60}}}}}))
    lay.run_dir(dom).mkdir(parents=True)
    TrainRecord(config={}, model={"id": "embedded"}, placement={}, status="failed",
                error="loss became NaN at step 3").write(lay.train_metrics(dom))
    base = lay.run_dir(lay.base_id("smol", "arith"))
    base.mkdir(parents=True)
    (base / "scores.json").write_text(json.dumps({"arith/exact_match": 0.1}))
    return params, lay


def test_report_marks_failed_and_missing_and_fills_tables(grid):
    params, lay = grid
    out = write_report(params, lay)
    assert out["statuses"] == {"smol-arith-lora-0": "ok", "smol-arith-domlora-0": "failed: loss became NaN at step 3"}
    tables = (lay.reports / "tables.md").read_text()
    assert "Table 1" in tables and "Table 10" in tables
    row = next(line for line in tables.splitlines() if line.startswith("| LoRA |"))
    assert "25.00 ± 5.6" in row and "4.88M" in row
    base_row = next(line for line in tables.splitlines() if line.startswith("| Base model |"))
    assert "10.00" in base_row and "±" not in base_row  # no eval.json for the base: no standard error invented
    dom_row = next(line for line in tables.splitlines() if line.startswith("| DomLoRA |"))
    assert "failed" in dom_row and "–" in dom_row
    readme = (lay.reports / "README.md").read_text()
    assert "model.layers.1.mlp.down_proj" in readme and "Task stability" in readme
    assert "argmax agreement 0%" in readme and "dom agreement 100%" in readme
    assert (lay.reports / "figures" / "page_by_layer.png").stat().st_size > 1000
    m = json.loads((lay.reports / "metrics.json").read_text())
    assert m["cells_ok"] == 1 and m["cells_total"] == 2
    csv = (lay.reports / "results.csv").read_text()
    assert "smol-arith-lora-0" in csv and "train/step_time_s,2.0" in csv


def test_report_marks_results_from_stand_in_data(grid):
    params, lay = grid
    write_report(params, lay)
    assert "STAND-IN" not in (lay.reports / "tables.md").read_text()
    assert "stand_in_runs" not in json.loads((lay.reports / "metrics.json").read_text())
    lora = params.cells()[0]
    doc = json.loads(lay.eval_json(lora).read_text())
    doc["tasks"]["arith"]["stand_in"] = True
    lay.eval_json(lora).write_text(json.dumps(doc))
    write_report(params, lay)
    for name in ("README.md", "tables.md"):
        text = (lay.reports / name).read_text()
        assert "**STAND-IN DATA" in text and f"stand-in data: {lora.id}" in text, name
    assert json.loads((lay.reports / "metrics.json").read_text())["stand_in_runs"] == 1


def test_report_with_nothing_present(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="ci")
    out = write_report(params, Layout(tmp_path))
    assert set(out["statuses"].values()) == {"missing"}
    assert (tmp_path / "reports" / "tables.md").exists()


def test_primary_metric_prefers_the_headline():
    met = {"humaneval_local/pass@1": 0.2, "humaneval_local/pass@1_stderr": 0.05, "arith/exact_match": 0.5}
    assert primary_metric("humaneval_local", met) == ("humaneval_local/pass@1", 0.2)
    assert primary_metric("arith", met)[1] == 0.5
    assert primary_metric("mmlu", met) is None


def test_paper_tables_use_the_papers_columns_and_restricted_rows(tmp_path):
    """Table 5 averages the paper's 8 columns (GSM8K from the math suite, no LogiQA / HumanEval), on LLaMA only;
    Table 1 keeps its 6 with GSM8K from the instruction suite; a NoRM row shows its reduced parameters."""
    params = load_params(ROOT / "params.yaml", profile="paper")
    lay = Layout(tmp_path)
    scores = {  # dataset -> flat scores every cell trained on it gets
        "tulu": {"mmlu_gen/exact_match": 0.6, "tydiqa/exact_match": 0.5, "commonsense_qa_gen/exact_match": 0.7,
                 "truthfulqa_mc1_gen/exact_match": 0.4, "gsm8k_cot_llama/exact_match_flexible_extract": 0.1,
                 "logiqa_gen/exact_match": 0.3},
        "metamath": {"gsm8k_cot_llama/exact_match_flexible_extract": 0.8, "minerva_math/exact_match": 0.2},
        "magicoder": {"humaneval_sandbox/pass@1": 0.5, "humaneval_plus_sandbox/pass@1": 0.45},
        "wizardlm": {"mt_bench/score": 6.0},
    }
    for c in params.cells(models=["llama31_8b"], methods=["domlora", "down_last", "norm_dom"]):
        lay.run_dir(c).mkdir(parents=True)
        lay.scores_json(c).write_text(json.dumps(scores[c.dataset]))
        TrainRecord(config={}, model={}, placement={}, status="success", trainable_params=2_359_296,
                    params_after_norm=1_200_000 if c.method == "norm_dom" else None).write(lay.train_metrics(c))
    write_report(params, lay)
    tables = (lay.reports / "tables.md").read_text()
    t5 = tables.split("### Table 5")[1].split("###")[0]
    assert "Qwen3-8B" not in t5 and "LLaMA-3.1-8B-Instruct" in t5
    header = next(line for line in t5.splitlines() if line.startswith("| Method"))
    assert header.split(" | ")[3:-2] == ["MMLU", "TyDiQA", "CQA", "TruthfulQA", "GSM8K", "MATH", "HumanEval+", "MT-Bench"]
    row = next(line for line in t5.splitlines() if line.startswith("| down_proj@31 |"))
    want = (60 + 50 + 70 + 40 + 80 + 20 + 45 + 60) / 8  # GSM8K 80 (MetaMathQA), MT-Bench x10
    assert f"| {want:.2f} |" in row
    t1 = tables.split("### Table 1")[1].split("###")[0]
    row = next(line for line in t1.splitlines() if line.startswith("| DomLoRA |") and "60.00" in line)
    assert "| 10.00 |" in row and "| 30.00 |" in row  # GSM8K from Tulu's evaluation, LogiQA present
    assert "2.36M → 1.20M" in tables  # NoRM's parameters after its reduction

"""reports/placement.md: one row per method with class, parameters, probe cost, modules, EM and NLL over seeds."""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import yaml

from domlora.pipeline.params import Cell, parse_profile
from domlora.pipeline.paths import Layout
from domlora.pipeline.placement_report import (collect, compare, describe_modules, flat_share, paired_difference,
                                               verdict, write_placement_report)

ROOT = Path(__file__).resolve().parents[1]
DOM = "model.layers.11.mlp.down_proj"


def _w(path: Path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@pytest.fixture
def params():
    d = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement_arith"]
    d = copy.deepcopy(d)
    d["grid"]["methods"] = ["dom", "kappa1", "lora"]
    d["grid"]["datasets"] = ["arith"]
    d["grid"]["probe_datasets"] = ["arith"]
    return parse_profile(d, name="placement")


def test_rows_aggregate_seeds_and_read_costs(tmp_path, params):
    lay = Layout(tmp_path)
    table = {DOM: {"type": "down_proj", "layer": 11, "d_in": 1536, "d_out": 576}}
    _w(lay.page_json("smol", "arith"), {"modules": table, "seconds": 41.5})
    _w(lay.placement("smol", "arith", "dom"), {"strategy": "dom", "modules": [DOM], "n_modules": 1})
    _w(lay.placement("smol", "arith", "kappa1"), {"strategy": "kappa", "modules": [DOM], "n_modules": 1,
                                                  "cost": {"wall_s": 6.2, "peak_over_model_mb": 12.0}})
    _w(lay.tune_json("smol", "arith", "module"), {"lr": 0.005, "lrs": [0.002, 0.005, 0.01], "methods": ["dom", "kappa1"],
                                                  "rule": "r", "val_samples": 64, "train_samples": 320,
                                                  "val_nll": {"dom": {"0.002": 0.3, "0.005": 0.2, "0.01": 0.25},
                                                              "kappa1": {"0.002": 0.4, "0.005": 0.3, "0.01": None}},
                                                  "mean_val_nll": {"0.002": 0.35, "0.005": 0.25, "0.01": None},
                                                  "best_lr_per_method": {"dom": 0.005, "kappa1": 0.005}})
    ems, nlls = [0.30, 0.35, 0.40], [0.20, 0.22, 0.24]
    for s in (0, 1, 2):
        c = Cell("smol", "arith", "dom", s)
        _w(lay.train_metrics(c), {"status": "success", "trainable_params": 135168, "config": {"lr": 0.005},
                                  "loss": [1.0] * 8 + [0.5] * 4 + [0.49] * 4})
        _w(lay.scores_json(c), {"arith/exact_match": ems[s], "arith_nll/nll": nlls[s]})
    rows = {r["method"]: r for r in collect(params, lay)}
    dom = rows["dom"]
    assert dom["em"] == pytest.approx(35.0) and dom["em_se"] == pytest.approx(statistics.stdev([30, 35, 40]) / 3 ** 0.5)
    assert dom["nll"] == pytest.approx(0.22) and dom["seeds"] == 3 and dom["lr"] == 0.005
    assert dom["cost"] == {"what": "PAGE probe", "wall_s": 41.5, "peak_mb": None}
    assert dom["flattened"] is True and dom["modules_text"] == f"`{DOM}`"
    assert rows["kappa1"]["cost"]["wall_s"] == 6.2 and rows["kappa1"]["em"] is None  # not run yet: a gap
    assert rows["lora"]["cost"]["what"] == "none"
    # the broad class runs seed 0 only: its row counts 1 expected cell, not one per grid seed
    assert rows["lora"]["cells"] == 1 and rows["dom"]["cells"] == 3
    out = write_placement_report(params, lay)
    md = (lay.reports / "placement.md").read_text()
    assert "### Tier `module`" in md and "| DomLoRA (PAGE dom) | 135.2k | 0.005 | – | PAGE probe: 41.5 s |" in md
    assert "35.0 ± 2.9" in md and "0.2200 ± 0.0115" in md
    assert "Tier `module` (" in md and "| **0.2000** |" in md  # the chosen rate of the sweep table in bold
    assert "### Verdict per tier" in md
    assert out["figures"] and Path(out["figures"][0]).is_file()


def test_flat_share_and_module_descriptions():
    assert flat_share([4, 4, 3, 3, 2, 2, 1, 1]) == pytest.approx(1 / 3)  # (2 - 1) / (4 - 1)
    assert flat_share([4, 4, 1.2, 1.2, 1.05, 1.05, 1.0, 1.0]) == pytest.approx(0.05 / 3)
    assert flat_share([1.0] * 8) is None  # no improvement to share
    assert flat_share([1, 2, 3]) is None
    table = {f"model.layers.{i}.mlp.{t}": {"type": t, "layer": i} for i in range(3) for t in ("up_proj", "down_proj")}
    assert describe_modules(list(table), table) == "6: up_proj x3, down_proj x3 in 3 layers (0-2)"
    assert describe_modules([], {}) == "–"


def _row(label, strategy, ems, nlls, budget="t"):
    return {"label": label, "strategy": strategy, "budget": budget,
            "em": statistics.fmean(ems), "em_se": statistics.stdev(ems) / len(ems) ** 0.5,
            "nll": statistics.fmean(nlls), "nll_se": statistics.stdev(nlls) / len(nlls) ** 0.5,
            "em_by_seed": dict(enumerate(ems)), "nll_by_seed": dict(enumerate(nlls))}


def test_paired_differences_and_the_verdict_follow_the_numbers():
    # page_rank beats LoRA in every seed by 5-7 points: beyond the noise, although the seeds themselves vary a lot
    lora = _row("LoRA r=10", "all", [40.0, 50.0, 60.0], [0.10, 0.09, 0.08])
    pr = _row("PAGE rank", "page_rank", [46.0, 55.0, 67.0], [0.09, 0.085, 0.07])
    kappa = _row("KappaTune", "kappa", [41.0, 49.0, 61.0], [0.095, 0.09, 0.081])
    d = paired_difference(lora["em_by_seed"], pr["em_by_seed"])
    assert d[0] == pytest.approx(-6.0) and d[1] == pytest.approx(statistics.stdev([-6, -5, -7]) / 3 ** 0.5) and d[2] == 3
    rows = {r["label"]: r for r in compare([lora, pr, kappa])}
    assert rows["PAGE rank"]["best_em"] and rows["PAGE rank"]["d_em"] is None
    text = verdict("t", [lora, pr, kappa], label="16% of LoRA")
    assert text.startswith("Tier `t` (16% of LoRA): by exact match **PAGE rank** leads")
    assert "more than the seeds' noise" in text and "PAGE's PAGE rank ranks 1 of 3" in text
    assert "PAGE rank minus LoRA r=10 at the same parameter count: +6.0 ± 0.6 points" in text
    # without a tier the counts differ, so the verdict says them instead of calling them equal
    untiered = verdict(None, [dict(lora, budget=None, trainable_params=73_859_072),
                              dict(pr, budget=None, trainable_params=671_744)])
    assert "same parameter count" not in untiered
    assert "PAGE rank minus LoRA r=10 (671.7k against 73.86M trainable parameters): +6.0 ± 0.6 points" in untiered
    # the other way round: a tie within the noise is called one
    flipped = verdict("t", [_row("A", "all", [50.0, 40.0, 60.0], [0.1, 0.1, 0.1]),
                            _row("B", "page_budget", [52.0, 38.0, 61.0], [0.1, 0.1, 0.1])])
    assert "within the seeds' noise" in flipped

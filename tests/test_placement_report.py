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
from domlora.pipeline.placement_report import collect, describe_modules, flat_share, write_placement_report

ROOT = Path(__file__).resolve().parents[1]
DOM = "model.layers.11.mlp.down_proj"


def _w(path: Path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@pytest.fixture
def params():
    d = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement"]
    d = copy.deepcopy(d)
    d["grid"]["methods"] = ["dom", "kappa1", "full_dom", "lora"]
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
    assert "| DomLoRA (PAGE dom) | module | 0.005 | 135.2k | PAGE probe: 41.5 s |" in md
    assert "35.0 ± 2.9" in md and "0.2200 ± 0.0115" in md
    assert "Class `module`" in md and "| **mean** |" in md
    assert out["figures"] and Path(out["figures"][0]).is_file()


def test_flat_share_and_module_descriptions():
    assert flat_share([4, 4, 3, 3, 2, 2, 1, 1]) == pytest.approx(1 / 3)  # (2 - 1) / (4 - 1)
    assert flat_share([4, 4, 1.2, 1.2, 1.05, 1.05, 1.0, 1.0]) == pytest.approx(0.05 / 3)
    assert flat_share([1.0] * 8) is None  # no improvement to share
    assert flat_share([1, 2, 3]) is None
    table = {f"model.layers.{i}.mlp.{t}": {"type": t, "layer": i} for i in range(3) for t in ("up_proj", "down_proj")}
    assert describe_modules(list(table), table) == "6: up_proj x3, down_proj x3 in 3 layers (0-2)"
    assert describe_modules([], {}) == "–"

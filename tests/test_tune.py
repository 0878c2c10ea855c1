"""Budget classes and their learning-rate sweep: validated profiles, the choice rule, what cells train with."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import chat_samples
from domlora.errors import ConfigError
from domlora.pipeline.params import Cell, parse_profile
from domlora.pipeline.paths import Layout
from domlora.pipeline.tune import Sweep, cell_overrides, sweeps, tune_stage, tunes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def placement_doc():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement"]


def _parse(d):
    return parse_profile(copy.deepcopy(d), name="placement")


class TestProfile:
    def test_the_placement_profile_has_every_peer_and_class(self, placement_doc):
        p = _parse(placement_doc)
        strategies = {p.methods[m].placement for m in p.grid.methods}
        assert {"dom", "page_argmax", "massive", "kappa", "aletheia", "eva", "plop", "random", "explicit",
                "all", "page_topk"} <= strategies
        assert {m: p.methods[m].budget for m in p.grid.methods if p.methods[m].budget is None} == {}
        module = [m for m in p.grid.methods if p.methods[m].budget == "module"]
        assert len(p.method_seeds(module[0])) >= 3, "the single-module class runs at least 3 seeds"
        assert {t: p.datasets[t].n_eval for t in p.grid.datasets} == {"arith": 200, "strings": 200}

    def test_unknown_peer_option(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["methods"]["kappa1"]["peer"] = {"num_module": 1}
        with pytest.raises(ConfigError, match=r"methods\.kappa1\.peer.*unknown key `kappa option\.num_module` "
                                               r"\(did you mean num_modules\?\)"):
            _parse(d)

    def test_peer_options_on_a_strategy_without_peers(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["methods"]["dom"]["peer"] = {"top_p": 0.1}
        with pytest.raises(ConfigError, match="strategy 'dom' takes no peer options"):
            _parse(d)

    def test_eva_needs_its_initialisation(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        del d["methods"]["eva"]["lora_init"]
        with pytest.raises(ConfigError, match="add `lora_init: eva`"):
            _parse(d)

    def test_a_budget_class_with_no_method(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["tune"]["budgets"]["layer"] = {"lrs": [1e-3, 2e-3]}
        with pytest.raises(ConfigError, match=r"tune\.budgets\.layer` has no method in `grid\.methods`"):
            _parse(d)

    def test_an_undeclared_budget_class(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["methods"]["dom"]["budget"] = "modul"
        with pytest.raises(ConfigError, match=r"'modul' \(did you mean module\?\).*declared: module, full, broad"):
            _parse(d)

    def test_a_budget_method_cannot_set_its_own_lr(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["methods"]["dom"]["lr"] = 1e-2
        with pytest.raises(ConfigError, match="remove its `lr`"):
            _parse(d)

    def test_validation_split_must_fit(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["tune"]["val_samples"] = 400
        with pytest.raises(ConfigError, match="must exceed `tune.val_samples`"):
            _parse(d)

    def test_class_seeds_come_from_the_grid(self, placement_doc):
        d = copy.deepcopy(placement_doc)
        d["tune"]["budgets"]["broad"]["seeds"] = [7]
        with pytest.raises(ConfigError, match=r"seeds` has \[7\]"):
            _parse(d)


def test_cells_sweeps_and_tunes(placement_doc):
    d = copy.deepcopy(placement_doc)
    d["tune"]["reuse_from"] = None  # each dataset sweeps its own rates
    p = _parse(d)
    cells = p.cells()
    assert {c.seed for c in cells if c.method == "dom"} == {0, 1, 2}
    assert {c.seed for c in cells if c.method == "lora"} == {0}  # broad: one seed
    runs = sweeps(p)
    n_lrs = {b: len(s.lrs) for b, s in p.tune.budgets.items()}
    assert len(runs) == len(p.grid.datasets) * sum(n_lrs[p.methods[m].budget] for m in p.grid.methods)
    assert len(tunes(p)) == len(p.grid.datasets) * len(p.tune.budgets)
    assert Sweep.parse("smol-arith-dom-lr2") == Sweep("smol", "arith", "dom", 2)
    with pytest.raises(ConfigError):
        Sweep.parse("smol-arith-dom-2")
    p2 = _parse(placement_doc)  # the profile sweeps once, on arith
    assert p2.tune.reuse_from == "arith"
    assert {s.dataset for s in sweeps(p2)} == {"arith"} and {t[1] for t in tunes(p2)} == {"arith"}


def test_grid_doc_gives_each_cell_its_lr_source(placement_doc):
    from domlora.pipeline.grid import grid_doc

    doc = grid_doc(_parse(placement_doc))
    # strings trains at the rate arith's sweep chose (tune.reuse_from)
    assert doc["cells"]["smol-strings-dom-1"]["lr_from"] == "placements/smol/arith/tuning/module.json"
    assert doc["sweeps"]["smol-arith-eva-lr1"] == {"model": "smol", "dataset": "arith", "method": "eva",
                                                   "lr": "lr1", "budget": "broad"}
    assert doc["tunes"]["smol-arith-full"] == {"model": "smol", "dataset": "arith", "budget": "full"}
    emb = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["embedded"]
    e = grid_doc(parse_profile(emb, name="embedded"))
    # without budget classes a cell's lr source is its placement, already a dependency: DVC sees no change
    assert e["cells"]["smol-arith-domlora-0"]["lr_from"] == "placements/smol/arith/domlora.json"
    assert e["sweeps"] == {} and e["tunes"] == {}


def _write_sweep(layout, budget, method, i, lr, nll):
    path = layout.sweep_json("smol", "arith", budget, method, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lr": lr, "val_nll": nll}))


def test_tune_chooses_the_lowest_mean_and_counts_divergence_as_infinite(tmp_path, placement_doc):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    methods = p.budget_methods("module")
    lrs = p.tune.budgets["module"].lrs
    # every method is best at the middle rate except one that is best at the largest; the largest diverges once
    for j, meth in enumerate(methods):
        for i, lr in enumerate(lrs):
            nll = {0: 1.0, 1: 0.5, 2: 0.4 if j == 0 else 0.7}[i]
            _write_sweep(lay, "module", meth, i, lr, None if (j == 1 and i == 2) else nll)
    doc = tune_stage(p, "smol", "arith", "module", layout=lay)
    assert doc["lr"] == lrs[1] and doc["mean_val_nll"][repr(float(lrs[2]))] is None
    assert doc["best_lr_per_method"][methods[0]] == lrs[2]  # its own optimum did not decide
    assert json.loads(lay.tune_json("smol", "arith", "module").read_text())["lr"] == lrs[1]
    c = Cell("smol", "arith", "dom", 2)
    assert cell_overrides(p, c, layout=lay) == {"lr": lrs[1], "limit_samples": 384 - 64}
    # strings reads arith's choice and still keeps its own validation split out of training
    assert cell_overrides(p, Cell("smol", "strings", "dom", 0), layout=lay) == {"lr": lrs[1],
                                                                                "limit_samples": 384 - 64}


def test_tune_refuses_missing_and_stale_sweeps(tmp_path, placement_doc):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    with pytest.raises(ConfigError, match="lacks sweep runs smol-arith-full_dom-lr0"):
        tune_stage(p, "smol", "arith", "full", layout=lay)
    for i in range(3):
        _write_sweep(lay, "full", "full_dom", i, 1.0, 0.5)
    with pytest.raises(ConfigError, match="was swept at lr 1.0"):
        tune_stage(p, "smol", "arith", "full", layout=lay)
    with pytest.raises(ConfigError, match="has not been chosen"):
        cell_overrides(p, Cell("smol", "arith", "lora", 0), layout=lay)


def test_every_rate_diverging_is_an_error(tmp_path, placement_doc):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    for i, lr in enumerate(p.tune.budgets["full"].lrs):
        _write_sweep(lay, "full", "full_dom", i, lr, None)
    with pytest.raises(ConfigError, match="add smaller rates"):
        tune_stage(p, "smol", "arith", "full", layout=lay)


def test_sweep_stage_trains_on_the_carved_split_and_scores_the_rest(tmp_path, tiny_model_dir):
    """A sweep run on a tiny checkpoint: trains the method at one rate on n_train - val samples, scores the rest."""
    from domlora.pipeline.stages.sweep import sweep_stage

    d = {"profile": "t", "models": {"tiny": {"id": str(tiny_model_dir)}},
         "datasets": {"arith": {"source": "arith", "n_train": 12, "n_eval": 2, "tasks": ["arith", "arith_nll"]}},
         "methods": {"one": {"placement": "explicit", "layers": [1], "types": ["down_proj"], "budget": "module"}},
         "tune": {"val_samples": 8, "budgets": {"module": {"lrs": [1e-3, 1e-2], "modules": 1}}},
         "train": {"rank": 2, "alpha": 4, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 128,
                   "gradient_checkpointing": False, "save_every": 0},
         "eval": {"batch_size": 4}, "tracking": {"enabled": False},
         "grid": {"models": ["tiny"], "datasets": ["arith"], "methods": ["one"], "seeds": [0]}}
    p = parse_profile(d, name="t")
    lay = Layout(tmp_path)
    lay.data_dir("arith").mkdir(parents=True)
    lay.split("arith", "train").write_text("".join(json.dumps(s) + "\n" for s in chat_samples(12)))
    pl = lay.placement("tiny", "arith", "one")
    pl.parent.mkdir(parents=True)
    pl.write_text(json.dumps({"strategy": "explicit", "modules": ["model.layers.1.mlp.down_proj"]}))
    doc = sweep_stage(p, "tiny-arith-one-lr1", layout=lay)
    assert doc["status"] == "success" and doc["lr"] == 1e-2 and doc["train_samples"] == 4
    assert doc["val_samples"] == 8 and doc["val"]["n"] == 8 and math.isfinite(doc["val_nll"])
    assert len(doc["loss"]) == 2 and doc["trainable_params"] == 2 * (24 + 16)
    assert json.loads(lay.sweep_json("tiny", "arith", "module", "one", 1).read_text()) == doc
    with pytest.raises(ConfigError, match="not a sweep run"):
        sweep_stage(p, "tiny-arith-one-lr5", layout=lay)

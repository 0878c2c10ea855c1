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
from domlora.pipeline.stages.tune import tune_stage
from domlora.pipeline.tune import Sweep, cell_overrides, sweeps, tunes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def placement_doc():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement_all"]


def _parse(d):
    return parse_profile(copy.deepcopy(d), name="placement_all")


class TestProfile:
    def test_the_placement_profiles_have_every_peer_and_tier(self, placement_doc):
        p = _parse(placement_doc)
        strategies = {p.methods[m].placement for m in p.grid.methods}
        assert {"dom", "massive", "kappa", "aletheia", "eva", "plop", "random", "explicit", "all", "page_budget",
                "page_rank"} <= strategies
        assert {m: p.methods[m].budget for m in p.grid.methods if p.methods[m].budget is None} == {}
        assert all(spec.reference for spec in p.tune.budgets.values()), "every tier has equal budgets"
        assert all(len(p.method_seeds(m)) >= 3 for m in p.grid.methods), "every row runs at least 3 seeds"
        assert {t: p.datasets[t].n_eval for t in p.grid.datasets} == {"arith": 200, "strings": 200}
        assert p.grid.models == ["smol", "gemma"]
        doc = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement"]
        cut = parse_profile(doc, name="placement")  # the <= 6 h cut: one-module and 16% tiers, both backbones, arith
        assert set(cut.tune.budgets) == {"module", "kappa"} and cut.grid.models == ["smol", "gemma"]
        assert cut.grid.datasets == ["arith"] and all(len(cut.method_seeds(m)) >= 3 for m in cut.grid.methods)
        assert {"dom", "page_budget", "page_rank", "lora_r10", "kappa", "random"} <= set(cut.grid.methods)

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
        with pytest.raises(ConfigError, match=r"'modul' \(did you mean module\?\).*declared: .*module"):
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
        d["tune"]["budgets"]["full"]["seeds"] = [7]
        with pytest.raises(ConfigError, match=r"seeds` has \[7\]"):
            _parse(d)


def test_cells_sweeps_and_tunes(placement_doc):
    d = copy.deepcopy(placement_doc)
    d["tune"]["reuse_from"] = None  # each dataset sweeps its own rates
    p = _parse(d)
    cells = p.cells()
    assert {c.seed for c in cells if c.method == "dom"} == {0, 1, 2}
    assert {c.seed for c in cells if c.method == "lora"} == {0, 1, 2}  # every row: 3 seeds
    runs = sweeps(p)
    n_lrs = {b: len(s.lrs) for b, s in p.tune.budgets.items()}
    per_model = len(p.grid.datasets) * sum(n_lrs[p.methods[m].budget] for m in p.grid.methods)
    assert len(runs) == len(p.grid.models) * per_model
    assert len(tunes(p)) == len(p.grid.models) * len(p.grid.datasets) * len(p.tune.budgets)
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
                                                   "lr": "lr1", "budget": "kappa"}
    assert doc["tunes"]["smol-arith-full"] == {"model": "smol", "dataset": "arith", "budget": "full"}
    emb = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["embedded"]
    e = grid_doc(parse_profile(emb, name="embedded"))
    # without budget classes a cell's lr source is its placement, already a dependency: DVC sees no change
    assert e["cells"]["smol-arith-domlora-0"]["lr_from"] == "placements/smol/arith/domlora.json"
    assert e["sweeps"] == {} and e["tunes"] == {}


def _write_sweep(layout, budget, method, i, lr, nll, *, params_n=1000, loss=None):
    path = layout.sweep_json("smol", "arith", budget, method, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lr": lr, "val_nll": nll, "trainable_params": params_n,
                                "loss": loss if loss is not None else FLAT}))


FLAT = [2.0] * 4 + [1.0] * 4 + [0.5] * 4 + [0.49] * 4     # the last quarter brought 1% of the improvement
STEEP = [2.0] * 4 + [1.5] * 4 + [1.0] * 4 + [0.5] * 4      # still falling: a third of it


def _fake_runs(monkeypatch, nll_of, loss_of=lambda method, steps: FLAT):
    """tuning_run without training: validation NLL and loss from the given functions; records its calls."""
    import domlora.pipeline.stages.tune as tune

    calls = []

    def run(params, model, dataset, method, lr, *, layout, steps=None, show_progress=False):
        calls.append((method, round(lr, 10), steps))
        return {"lr": lr, "val_nll": nll_of(method, lr), "loss": loss_of(method, steps), "trainable_params": 1000}
    monkeypatch.setattr(tune, "tuning_run", run)
    return calls


def test_each_method_gets_its_own_rate_and_divergence_counts_as_infinite(tmp_path, placement_doc, monkeypatch):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    methods = p.budget_methods("module")
    lrs = p.tune.budgets["module"].lrs
    # method 0 is best at the middle rate; method 1 at the smallest but diverges there; the others in the middle
    table = {0: {0: 1.0, 1: 0.4, 2: 0.7}, 1: {0: None, 1: 0.5, 2: 0.9}}
    for j, meth in enumerate(methods):
        for i, lr in enumerate(lrs):
            _write_sweep(lay, "module", meth, i, lr, table.get(j, {0: 1.0, 1: 0.5, 2: 0.6})[i])
    calls = _fake_runs(monkeypatch, lambda m, lr: 9.0)
    doc = tune_stage(p, "smol", "arith", "module", layout=lay)
    assert doc["lr_per_method"] == {m: lrs[1] for m in methods} and calls == []  # all interior: nothing extended
    assert doc["val_nll"][methods[1]][repr(float(lrs[0]))] is None
    c = Cell("smol", "arith", "dom", 2)
    assert cell_overrides(p, c, layout=lay) == {"lr": lrs[1], "max_steps": p.train.max_steps,
                                                "limit_samples": 384 - 64}
    # strings reads arith's choice and still keeps its own validation split out of training
    assert cell_overrides(p, Cell("smol", "strings", "dom", 0), layout=lay)["limit_samples"] == 384 - 64


def test_a_rate_at_the_edge_extends_the_grid_then_fails_with_the_fix(tmp_path, placement_doc, monkeypatch):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    methods = p.budget_methods("module")
    lrs = p.tune.budgets["module"].lrs
    for meth in methods:
        for i, lr in enumerate(lrs):
            _write_sweep(lay, "module", meth, i, lr, {0: 1.0, 1: 0.5, 2: 0.3}[i] if meth == "dom" else [1, .5, .6][i])
    step = lrs[2] / lrs[1]
    # dom keeps improving one step past the grid, then worsens: one extension, an interior choice
    calls = _fake_runs(monkeypatch, lambda m, lr: 0.2 if abs(lr - lrs[2] * step) < 1e-12 else 0.8)
    doc = tune_stage(p, "smol", "arith", "module", layout=lay)
    assert doc["lr_per_method"]["dom"] == pytest.approx(lrs[2] * step)
    assert [c[0] for c in calls] == ["dom", "dom"] and doc["extended"]["dom"] == pytest.approx(
        [lrs[2] * step, lrs[2] * step ** 2])
    # always better further out: the grid may not grow past `extend` steps
    _fake_runs(monkeypatch, lambda m, lr: 0.1 * lrs[2] / lr)
    with pytest.raises(ConfigError, match=r"method 'dom' .* at the edge of its grid .* fix: widen "
                                          r"tune\.budgets\.module\.lrs"):
        tune_stage(p, "smol", "arith", "module", layout=lay)
    # a wiring profile may keep it instead, marked in the tune file
    d = copy.deepcopy(placement_doc)
    d["tune"]["budgets"]["module"]["on_edge"] = "keep"
    doc = tune_stage(_parse(d), "smol", "arith", "module", layout=lay)
    assert doc["at_edge"] == ["dom"] and doc["lr_per_method"]["dom"] == pytest.approx(lrs[2] * step ** 2)


def test_the_tier_trains_until_every_method_has_flattened(tmp_path, placement_doc, monkeypatch):
    d = copy.deepcopy(placement_doc)
    d["tune"]["budgets"]["module"]["steps"] = [16, 32, 64]
    p = _parse(d)
    lay = Layout(tmp_path)
    methods = p.budget_methods("module")
    for meth in methods:
        for i, lr in enumerate(p.tune.budgets["module"].lrs):
            _write_sweep(lay, "module", meth, i, lr, [1, .5, .6][i], loss=STEEP if meth == "dom" else FLAT)
    # dom is still falling at 16 steps and at 32, flat at 64; nobody else needs longer
    calls = _fake_runs(monkeypatch, lambda m, lr: 0.5, lambda m, steps: FLAT if steps == 64 else STEEP)
    doc = tune_stage(p, "smol", "arith", "module", layout=lay)
    assert doc["steps"] == 64 and all(doc["flat"].values())
    assert sorted(c[2] for c in calls) == [32, 64] and {c[0] for c in calls} == {"dom"}
    assert cell_overrides(p, Cell("smol", "arith", "random", 1), layout=lay)["max_steps"] == 64


def test_a_tier_whose_methods_differ_by_more_than_15_percent_is_refused(tmp_path, placement_doc, monkeypatch):
    d = copy.deepcopy(placement_doc)
    d["tune"]["budgets"]["module"]["reference"] = "dom"
    p = _parse(d)
    lay = Layout(tmp_path)
    for meth in p.budget_methods("module"):
        for i, lr in enumerate(p.tune.budgets["module"].lrs):
            _write_sweep(lay, "module", meth, i, lr, [1, .5, .6][i], params_n=49152 if meth == "kappa1" else 135168)
    _fake_runs(monkeypatch, lambda m, lr: 0.5)
    with pytest.raises(ConfigError, match=r"tier 'module' on smol: its methods differ by 175% .*kappa1: 49,152.*fix"):
        tune_stage(p, "smol", "arith", "module", layout=lay)


def test_a_rate_grid_with_one_point_is_refused(placement_doc):
    d = copy.deepcopy(placement_doc)
    d["tune"]["budgets"]["module"]["lrs"] = [5e-3]
    with pytest.raises(ConfigError, match=r"at least two distinct learning rates.*fix: e\.g\. lrs:"):
        _parse(d)


def test_tune_refuses_missing_and_stale_sweeps(tmp_path, placement_doc):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    with pytest.raises(ConfigError, match="lacks sweep runs smol-arith-lora-lr0"):
        tune_stage(p, "smol", "arith", "full", layout=lay)
    for meth in p.budget_methods("full"):
        for i in range(3):
            _write_sweep(lay, "full", meth, i, 1.0, 0.5)
    with pytest.raises(ConfigError, match="was swept at lr 1.0"):
        tune_stage(p, "smol", "arith", "full", layout=lay)
    with pytest.raises(ConfigError, match="has not been chosen"):
        cell_overrides(p, Cell("smol", "arith", "lora", 0), layout=lay)


def test_every_rate_diverging_looks_below_the_grid(tmp_path, placement_doc, monkeypatch):
    p = _parse(placement_doc)
    lay = Layout(tmp_path)
    lrs = p.tune.budgets["full"].lrs
    for meth in p.budget_methods("full"):
        for i, lr in enumerate(lrs):
            _write_sweep(lay, "full", meth, i, lr, None)
    calls = _fake_runs(monkeypatch, lambda m, lr: None)
    with pytest.raises(ConfigError, match="at the edge of its grid"):
        tune_stage(p, "smol", "arith", "full", layout=lay)
    assert [c[1] for c in calls] == pytest.approx([lrs[0] ** 2 / lrs[1], lrs[0] ** 3 / lrs[1] ** 2])


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


def test_tier_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_model_dir):
    """select (page_rank from a PAGE table, a rank-matched random module), sweep, tune (edges extended, steps
    decided), and the cells' overrides, all with real training on a tiny checkpoint."""
    from domlora.pipeline.stages import select_stage
    from domlora.pipeline.stages.sweep import sweep_stage

    d = {"profile": "t", "models": {"tiny": {"id": str(tiny_model_dir)}},
         "datasets": {"arith": {"source": "arith", "n_train": 16, "n_eval": 2, "tasks": ["arith", "arith_nll"]}},
         "methods": {"one": {"placement": "explicit", "layers": [1], "types": ["down_proj"], "budget": "module"},
                     "rnd": {"placement": "random", "k": 1, "match_tier": True, "budget": "module"},
                     "pr": {"placement": "page_rank", "total_rank": 12, "max_modules": 3, "budget": "module"}},
         "tune": {"val_samples": 8, "budgets": {"module": {"lrs": [1e-3, 1e-2], "reference": "one", "extend": 1,
                                                           "on_edge": "keep", "steps": [2, 8]}}},
         "train": {"rank": 4, "alpha": 8, "max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 128,
                   "gradient_checkpointing": False, "save_every": 0},
         "eval": {"batch_size": 4}, "tracking": {"enabled": False},
         "grid": {"models": ["tiny"], "datasets": ["arith"], "methods": ["one", "rnd", "pr"], "seeds": [0, 1, 2]}}
    p = parse_profile(d, name="t")
    lay = Layout(tmp_path)
    lay.data_dir("arith").mkdir(parents=True)
    lay.split("arith", "train").write_text("".join(json.dumps(s) + "\n" for s in chat_samples(16)))
    # a PAGE table of the tiny checkpoint's 3 layers (hidden 16, inter 24), down_proj of layer 1 on top
    shapes = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16), "gate_proj": (16, 24),
              "up_proj": (16, 24), "down_proj": (24, 16)}
    mods = {f"model.layers.{i}.{'mlp' if t.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{t}":
            {"type": t, "layer": i, "d_in": a, "d_out": b, "PAGE": 1.0 + (t == "down_proj") * (3 - abs(i - 1))}
            for i in range(3) for t, (a, b) in shapes.items()}
    page = lay.page_json("tiny", "arith")
    page.parent.mkdir(parents=True)
    page.write_text(json.dumps({"model": "tiny", "modules": mods}))
    # the reference adapts 4 x (24 + 16) = 160 parameters; page_rank's 12 ranks over 3 down_projs 480
    select_stage(p, "tiny", "arith", "one", layout=lay)
    rnd = select_stage(p, "tiny", "arith", "rnd", layout=lay)
    assert set(rnd["modules_by_seed"]) == {"0", "1", "2"} and abs(rnd["trainable_params"] / 160 - 1) <= 0.15
    with pytest.raises(ConfigError, match="differ by 200% .* fix"):
        select_stage(p, "tiny", "arith", "pr", layout=lay)
    d["methods"]["pr"] |= {"total_rank": 4, "max_modules": 2}  # 2 + 2 ranks over two down_projs: 160
    p = parse_profile(d, name="t")
    pr = select_stage(p, "tiny", "arith", "pr", layout=lay)
    assert sum(pr["rank_pattern"].values()) == 4 and pr["trainable_params"] == 160
    for s in sweeps(p):
        sweep_stage(p, s.id, layout=lay)
    doc = tune_stage(p, "tiny", "arith", "module", layout=lay)
    assert set(doc["lr_per_method"]) == {"one", "rnd", "pr"} and doc["steps"] in (2, 8)
    assert all(len(v) <= 1 for v in doc["extended"].values())  # a 2-rate grid always extends once, then keeps
    assert all(doc["extended"][m] or m not in doc["at_edge"] for m in doc["methods"])
    over = cell_overrides(p, Cell("tiny", "arith", "rnd", 2), layout=lay)
    assert over == {"lr": doc["lr_per_method"]["rnd"], "max_steps": doc["steps"], "limit_samples": 8}

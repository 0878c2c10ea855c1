"""Equal-budget tiers: counts from the module table, the 15% rule at the select stage, rank matching, per-seed draws."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from domlora.errors import ConfigError
from domlora.pipeline.params import parse_profile
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages import select_stage
from domlora.pipeline.tiers import check_counts, expected_params, seed_params, tier_spread

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M's projections (d_in, d_out), 30 layers: what `find_candidates` reads from its config
SMOL = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
SMOL_LORA_R1 = 305_280  # 30 x (1152 + 768 + 768 + 1152 + 3 x 2112)


def smol_page() -> dict:
    mods = {}
    for layer in range(30):
        for t, (d_in, d_out) in SMOL.items():
            page = 1.0 + layer * 0.01 + (5.0 if (layer, t) == (11, "down_proj") else 0.0) + (t == "v_proj") * 0.5
            mods[f"model.layers.{layer}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}"] = {
                "type": t, "layer": layer, "d_in": d_in, "d_out": d_out, "PAGE": page}
    return {"model": "smol", "modules": mods}


def profile(methods: dict, tiers: dict, seeds=(0, 1, 2)) -> dict:
    return {"profile": "t", "models": {"smol": {"id": "embedded"}},
            "datasets": {"arith": {"source": "arith", "n_train": 96, "n_eval": 8, "tasks": ["arith", "arith_nll"]}},
            "methods": methods, "tune": {"val_samples": 16, "budgets": tiers},
            "train": {"rank": 64, "alpha": 128, "max_steps": 4},
            "tracking": {"enabled": False},
            "grid": {"models": ["smol"], "datasets": ["arith"], "methods": list(methods), "seeds": list(seeds)}}


@pytest.fixture
def lay(tmp_path):
    lay = Layout(tmp_path)
    p = lay.page_json("smol", "arith")
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(smol_page()))
    return lay


def test_exact_counts_of_the_smol_tiers():
    d = profile({"lora_r1": {"placement": "all", "rank": 1, "alpha": 2, "budget": "small"},
                 "lora_r10": {"placement": "all", "rank": 10, "alpha": 20, "budget": "small"},
                 "dom": {"placement": "dom", "budget": "small"},
                 "pb": {"placement": "page_budget", "rank": 8, "alpha": 16, "budget_fraction": 0.125, "budget": "small"}},
                {"small": {"lrs": [1e-3, 3e-3]}})
    p = parse_profile(d, name="t")
    page = smol_page()
    table = page["modules"]
    assert expected_params(p, "smol", "lora_r1", table) == SMOL_LORA_R1
    assert expected_params(p, "smol", "lora_r10", table) == 10 * SMOL_LORA_R1 == 3_052_800
    assert expected_params(p, "smol", "dom", table, page) == 64 * (1536 + 576) == 135_168
    pb = expected_params(p, "smol", "pb", table, page)  # 1/8 of LoRA at rank 8 = LoRA at rank 1
    assert SMOL_LORA_R1 - 8 * 2112 < pb <= SMOL_LORA_R1
    assert tier_spread({"a": 100, "b": 115}) == pytest.approx(0.15)
    check_counts("x", {"a": 100, "b": 115}, model="smol")
    with pytest.raises(ConfigError, match=r"differ by 16% .*fix"):
        check_counts("x", {"a": 100, "b": 116}, model="smol")


def test_select_refuses_a_placement_off_its_tier(lay):
    d = profile({"dom": {"placement": "dom", "budget": "module"},
                 "q0": {"placement": "explicit", "layers": [0], "types": ["q_proj"], "budget": "module"}},
                {"module": {"lrs": [1e-3, 3e-3], "reference": "dom"}})
    p = parse_profile(d, name="t")
    doc = select_stage(p, "smol", "arith", "dom", layout=lay)
    assert doc["trainable_params"] == 135_168 and doc["tier"]["reference_params"] == 135_168
    with pytest.raises(ConfigError, match=r"tier 'module' on smol: its methods differ by 83% .*q0: 73,728.*fix"):
        select_stage(p, "smol", "arith", "q0", layout=lay)


def test_match_tier_gives_each_seeds_draw_the_reference_count(lay):
    d = profile({"dom": {"placement": "dom", "budget": "module"},
                 "random": {"placement": "random", "k": 1, "match_tier": True, "budget": "module"}},
                {"module": {"lrs": [1e-3, 3e-3], "reference": "dom"}})
    p = parse_profile(d, name="t")
    doc = select_stage(p, "smol", "arith", "random", layout=lay)
    assert set(doc["modules_by_seed"]) == {"0", "1", "2"}
    counts = seed_params(doc, smol_page()["modules"], rank=64)
    assert all(abs(c / 135_168 - 1) <= 0.15 for c in counts.values()), counts
    assert json.loads(lay.placement("smol", "arith", "random").read_text())["rank_pattern"] == doc["rank_pattern"]


def test_match_tier_needs_a_reference():
    d = profile({"dom": {"placement": "dom", "budget": "module"},
                 "random": {"placement": "random", "k": 1, "match_tier": True, "budget": "module"}},
                {"module": {"lrs": [1e-3, 3e-3]}})
    with pytest.raises(ConfigError, match="match_tier.*has none; fix: set `tune.budgets.module.reference`"):
        parse_profile(d, name="t")


def test_a_budget_in_both_units_is_refused_when_params_load():
    d = profile({"pb": {"placement": "page_budget", "budget_params": 3e6, "budget_fraction": 0.16,
                        "budget": "tier"}}, {"tier": {"lrs": [1e-3, 3e-3]}})
    with pytest.raises(ConfigError, match=r"methods\.pb`: the budget is given both .* fix: give one of them"):
        parse_profile(d, name="t")
    d = profile({"pr": {"placement": "page_rank", "total_rank": 10, "max_modules": 20, "budget": "tier"}},
                {"tier": {"lrs": [1e-3, 3e-3]}})
    with pytest.raises(ConfigError, match="total rank 10 is below its 20 modules"):
        parse_profile(d, name="t")


def test_the_placement_profiles_tiers_hold_within_15_percent():
    """Every fixed or PAGE placement of the placement profile, counted on SmolLM2's table against its tier's reference."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["placement"]
    p = parse_profile(copy.deepcopy(doc), name="placement")
    page = smol_page()
    for tier, spec in p.tune.budgets.items():
        if spec.reference is None:
            continue
        ref = expected_params(p, "smol", spec.reference, page["modules"], page)
        for m in p.budget_methods(tier):
            if p.methods[m].placement in ("kappa", "aletheia", "eva", "massive") or p.methods[m].match_tier:
                continue
            check_counts(tier, {m: expected_params(p, "smol", m, page["modules"], page), spec.reference: ref},
                         model="smol")

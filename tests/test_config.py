"""params.yaml validation: every mistake names the key and the allowed values before any work."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from domlora.pipeline.params import Cell, load_params, parse_profile, use_profile
from domlora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_profile_parses(raw):
    for name in raw["profiles"]:
        p = load_params(ROOT / "params.yaml", profile=name)
        # a probe-only profile (scale) has no cells, only probes
        assert p.cells() or (not p.grid.models and p.grid.probe_models), name
        for c in p.cells():
            assert Cell.parse(c.id) == c


def test_embedded_profiles_are_offline(raw):
    """The profiles a fresh clone runs (and CI) load nothing from the hub, whichever profile is active."""
    for name in ("embedded", "ci"):
        p = load_params(ROOT / "params.yaml", profile=name)
        assert all(m.id.startswith("embedded") for m in p.models.values()), name
    assert raw["run"]["profile"] in raw["profiles"]


def test_paper_profile_covers_the_paper_tables(raw):
    p = load_params(ROOT / "params.yaml", profile="paper")
    tables = {t for m in p.grid.methods for t in p.methods[m].tables}
    assert {1, 2, 3, 4, 5, 10, 11, 12} <= tables
    assert set(p.grid.models) == {"qwen3_8b", "llama31_8b"}
    assert p.train.lr == 2e-5 and p.train.rank == 64 and p.train.alpha == 128
    assert p.train_config("domlora_r16").rank == 16 and p.train_config("domlora_r16").alpha == 32
    # IST and AdaLoRA run on plain DDP, everything else on the profile's ZeRO-2
    assert p.train_config("ist").deepspeed is None and p.train_config("adalora_dom").deepspeed is None
    assert p.train_config("domlora").deepspeed == "configs/deepspeed_zero2.json"


def test_method_overrides_are_any_train_field(raw):
    p = load_params(ROOT / "params.yaml", profile="embedded")
    c = p.train_config("grpo_random", seed=3)
    assert (c.rank, c.alpha, c.lr, c.max_steps, c.lr_schedule, c.seed) == (8, 16.0, 2e-3, 12, "constant", 3)
    assert p.methods["grpo_random"].sparse_b.k == 12000 and p.methods["grpo_random"].grpo is not None
    assert p.train_config("ist").layer_sampling == "ist"
    d = copy.deepcopy(raw["profiles"]["embedded"])
    d["methods"]["domlora"].update(max_grad_norm=0.5, lora_plus_ratio=8.0, adalora_beta2=0.5)
    q = parse_profile(d, name="run")
    assert (q.train_config("domlora").max_grad_norm, q.train_config("domlora").lora_plus_ratio) == (0.5, 8.0)


# every section a user can mistype: (mutation, the key named in the error, a word of the allowed / closest values)
MISTYPES = {
    "top level": (lambda d: d.update(profils={}), "params.yaml.profils", "profiles"),
    "profile": (lambda d: d["profiles"]["embedded"].update(trian={}), "trian", "train"),
    "models": (lambda d: d["profiles"]["embedded"]["models"]["smol"].update(dtpye="float32"), "dtpye", "dtype"),
    "models value": (lambda d: d["profiles"]["embedded"]["models"]["smol"].update(dtype="fp8"), "dtype", "bfloat16"),
    "datasets": (lambda d: d["profiles"]["embedded"]["datasets"]["arith"].update(n_trian=3), "n_trian", "n_train"),
    "probe": (lambda d: d["profiles"]["embedded"]["probe"].update(sample=3), "sample", "samples"),
    "methods": (lambda d: d["profiles"]["embedded"]["methods"]["lora"].update(placment="all"), "placment", "placement"),
    "methods train key": (lambda d: d["profiles"]["embedded"]["methods"]["lora"].update(lr_shedule="linear"),
                          "lr_shedule", "lr_schedule"),
    "methods sparse_b": (lambda d: d["profiles"]["embedded"]["methods"]["sparseb_random"]["sparse_b"].update(
        selction="random"), "sparse_b.selction", "selection"),
    "methods sparse_b value": (lambda d: d["profiles"]["embedded"]["methods"]["sparseb_random"]["sparse_b"].update(
        selection="randm"), "selection", "random"),
    "methods grpo": (lambda d: d["profiles"]["embedded"]["methods"]["grpo_lora"]["grpo"].update(num_generation=4),
                     "grpo.num_generation", "num_generations"),
    "train": (lambda d: d["profiles"]["embedded"]["train"].update(warmup=0.1), "warmup", "warmup_ratio"),
    "train value": (lambda d: d["profiles"]["embedded"]["train"].update(lr_schedule="cosin"), "lr_schedule", "cosine"),
    "eval": (lambda d: d["profiles"]["embedded"]["eval"].update(limt=3), "limt", "limit"),
    "tracking": (lambda d: d["profiles"]["embedded"]["tracking"].update(experiement="x"), "experiement", "experiment"),
    "grid": (lambda d: d["profiles"]["embedded"]["grid"].update(seed=[0]), "seed", "seeds"),
}


@pytest.mark.parametrize("section", sorted(MISTYPES))
def test_every_section_names_a_mistyped_key(raw, tmp_path, section):
    mutate, key, near = MISTYPES[section]
    doc = copy.deepcopy(raw)
    mutate(doc)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_params(f, profile=None if section == "top level" else "embedded")
    assert key in str(e.value) and near in str(e.value), str(e.value)


def _bad(raw, mutate):
    d = copy.deepcopy(raw["profiles"]["embedded"])
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_profile(d, name="run")
    return str(e.value)


def test_unknown_strategy_names_allowed_values(raw):
    msg = _bad(raw, lambda d: d["methods"]["lora"].update(placement="domm"))
    assert "run.methods.lora.placement" in msg and "dom" in msg and "page_topk" in msg


def test_typo_in_key(raw):
    msg = _bad(raw, lambda d: d["train"].update(learning_rate=1e-3))
    assert "run.train.learning_rate" in msg and "lr" in msg


def test_wrong_type(raw):
    msg = _bad(raw, lambda d: d["train"].update(max_steps="many"))
    assert "run.train.max_steps" in msg and "int" in msg


def test_grid_names_undefined_method(raw):
    msg = _bad(raw, lambda d: d["grid"]["methods"].append("domlor"))
    assert "domlor" in msg and "domlora" in msg


def test_slug_with_dash_rejected(raw):
    def mutate(d):
        d["methods"]["dom-lora"] = d["methods"]["domlora"]
    assert "slugs" in _bad(raw, mutate)


def test_unknown_variant(raw):
    pytest.importorskip("domlora.adapters.variants")
    msg = _bad(raw, lambda d: d["methods"]["domlora"].update(variant="lorax"))
    assert "variant" in msg and "lora" in msg


def test_trained_dataset_must_be_probed(raw):
    msg = _bad(raw, lambda d: d["grid"].update(probe_datasets=["humaneval"]))
    assert "probe_datasets" in msg


def test_subset_of_cells(raw):
    p = load_params(ROOT / "params.yaml", profile="paper")
    sub = p.cells(models=["llama31_8b"], methods=["down_last", "up1"])
    assert {c.model for c in sub} == {"llama31_8b"} and len(sub) == 2 * len(p.grid.datasets)
    with pytest.raises(ConfigError):
        p.cells(methods=["nope"])


def test_use_profile_switches_and_keeps_anchors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text())
    use_profile(f, "paper")
    assert load_params(f).profile == "paper"
    text = f.read_text()
    # a YAML round trip (e.g. `dvc exp run -S`) may drop unused anchors: switching restores them
    f.write_text(text.replace("  ci: &ci", "  ci:"))
    use_profile(f, "ci")
    assert load_params(f).profile == "ci"
    with pytest.raises(ConfigError):
        use_profile(f, "nope")


def test_a_probe_set_has_its_own_length(raw):
    p = load_params(ROOT / "params.yaml", profile="embedded")
    # code solutions are longer than arithmetic: HumanEval's probe set is not cut at the default length
    assert p.probe_max_length("humaneval") == 768 and p.probe_max_length("arith") == p.probe.max_length == 256
    d = copy.deepcopy(raw["profiles"]["embedded"])
    d["probe"]["max_lengths"] = {"humaneal": 512}
    with pytest.raises(ConfigError, match=r"probe.max_lengths` names humaneal.*humaneval"):
        parse_profile(d, name="run")
    d["probe"]["max_lengths"] = {"humaneval": 1}
    with pytest.raises(ConfigError, match="probe values out of range"):
        parse_profile(d, name="run")


def test_nfn_form_is_the_reference_unless_named(raw):
    assert load_params(ROOT / "params.yaml", profile="embedded").probe.nfn_form == "reference"
    d = copy.deepcopy(raw["profiles"]["embedded"])
    d["probe"]["nfn_form"] = "squard"
    with pytest.raises(ConfigError, match="nfn_form.*allowed values: reference, squared"):
        parse_profile(d, name="run")


def test_placement_smol_is_the_placement_profile_on_smollm2(raw):
    """`placement_smol` runs the `placement` stages of SmolLM2 with the same parameters, so a later `placement`
    run restores them from DVC's cache instead of recomputing them."""
    full, smol = raw["profiles"]["placement"], raw["profiles"]["placement_smol"]
    assert set(full) == set(smol)
    for key in set(full) - {"profile", "grid"}:
        assert smol[key] == full[key], key
    a = load_params(ROOT / "params.yaml", profile="placement")
    b = load_params(ROOT / "params.yaml", profile="placement_smol")
    assert b.cells() and {c.id for c in b.cells()} == {c.id for c in a.cells() if c.model == "smol"}


@pytest.mark.parametrize("name,tier", [("placement_gemma_module", "module"), ("placement_gemma_kappa", "kappa")])
def test_gemma_halves_are_the_placement_profile_one_tier_each(raw, name, tier):
    """Gemma's half of `placement` split by tier, so each part fits one working session: the same models, data,
    methods, training and tier settings as `placement`; together the two parts are `placement`'s Gemma cells."""
    full, part = raw["profiles"]["placement"], raw["profiles"][name]
    assert set(full) == set(part)
    for key in set(full) - {"profile", "grid", "tune"}:
        assert part[key] == full[key], key
    assert part["tune"]["budgets"] == {tier: full["tune"]["budgets"][tier]}
    assert {k: v for k, v in part["tune"].items() if k != "budgets"} == \
        {k: v for k, v in full["tune"].items() if k != "budgets"}
    a = load_params(ROOT / "params.yaml", profile="placement")
    b = load_params(ROOT / "params.yaml", profile=name)
    want = {c.id for c in a.cells() if c.model == "gemma" and a.methods[c.method].budget == tier}
    assert b.cells() and {c.id for c in b.cells()} == want


def test_gemma_halves_cover_placements_gemma_cells():
    a = load_params(ROOT / "params.yaml", profile="placement")
    parts = [load_params(ROOT / "params.yaml", profile=p) for p in ("placement_gemma_module", "placement_gemma_kappa")]
    assert {c.id for p in parts for c in p.cells()} == {c.id for c in a.cells() if c.model == "gemma"}

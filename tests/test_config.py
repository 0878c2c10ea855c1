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
        assert p.cells(), name
        for c in p.cells():
            assert Cell.parse(c.id) == c


def test_active_profile_is_embedded_and_offline(raw):
    p = load_params(ROOT / "params.yaml")
    assert p.profile == "embedded"
    assert all(m.id == "embedded" for m in p.models.values())


def test_paper_profile_covers_the_paper_tables(raw):
    p = load_params(ROOT / "params.yaml", profile="paper")
    tables = {t for m in p.grid.methods for t in p.methods[m].tables}
    assert {1, 2, 3, 4, 5, 10, 11, 12} <= tables
    assert set(p.grid.models) == {"qwen3_8b", "llama31_8b"}
    assert p.train.lr == 2e-5 and p.train.rank == 64 and p.train.alpha == 128
    assert p.method_train("domlora_r16").rank == 16 and p.method_train("domlora_r16").alpha == 32


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
    f.write_text(text.replace("  embedded: &embedded", "  embedded:"))
    use_profile(f, "embedded")
    assert load_params(f).profile == "embedded"
    with pytest.raises(ConfigError):
        use_profile(f, "nope")

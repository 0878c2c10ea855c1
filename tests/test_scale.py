"""The `scale` profile: three backbones probed, no training; the dominant-module table with bootstrap columns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domlora.errors import ConfigError
from domlora.pipeline.grid import grid_doc
from domlora.pipeline.params import load_params, parse_profile
from domlora.pipeline.paths import Layout
from domlora.pipeline.registry import load_registry, record
from domlora.pipeline.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def _page_doc(model: str, dom_layer: int, *, dom_boot: float, argmax_boot: float, n_layers: int = 4) -> dict:
    mods = {}
    for layer in range(n_layers):
        for t in ("v_proj", "down_proj"):
            name = f"model.layers.{layer}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}"
            page = 10.0 if (t == "down_proj" and layer == dom_layer) else 1.0
            mods[name] = {"type": t, "layer": layer, "d_in": 8, "d_out": 8, "S": page, "PAGE": page}
    dom = f"model.layers.{dom_layer}.mlp.down_proj"
    return {"model": model, "dominant": dom, "argmax": dom, "n_layers": n_layers, "dominant_share_total": 0.2,
            "dominant_share_type": 0.6, "modules": mods,
            "bootstrap": {"n_boot": 1000, "dom": dom, "argmax": dom, "dom_stability": dom_boot,
                          "argmax_stability": argmax_boot}}


class TestProfile:
    def test_three_backbones_probed_nothing_trained(self):
        p = load_params(ROOT / "params.yaml", profile="scale")
        assert [p.models[m].id for m in p.grid.probe_models] == ["embedded", "embedded-gemma", "embedded-qwen"]
        assert p.cells() == []
        doc = grid_doc(p)
        assert len(doc["probes"]) == 9 and doc["cells"] == doc["selects"] == doc["bases"] == {}

    def test_only_a_probe_only_grid_may_leave_axes_empty(self):
        import yaml

        prof = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["scale"]
        prof["grid"] = prof["grid"] | {"models": ["smol"]}  # trains a model, but on no dataset
        with pytest.raises(ConfigError, match=r"grid.datasets` is empty; fix: name at least one, or \(a probe-only "
                                              r"profile\) leave models, datasets and methods all empty"):
            parse_profile(prof, name="scale")
        prof["grid"] = prof["grid"] | {"models": [], "probe_models": []}
        with pytest.raises(ConfigError, match="grid.models` is empty"):  # nothing probed either
            parse_profile(prof, name="scale")


class TestScaleTrainProfile:
    """`scale_train`: the 1.5B training rows (docs/why.md "Training at 1.5B")."""

    def test_qwen_in_bfloat16_four_rows_one_seed(self):
        p = load_params(ROOT / "params.yaml", profile="scale_train")
        assert p.models["qwen"].id == "embedded-qwen" and p.models["qwen"].dtype == "bfloat16"
        assert sorted((c.model, c.method, c.seed) for c in p.cells()) == [
            ("qwen", m, 0) for m in ("domlora", "lora", "lora_r1", "random_down")]
        assert {t for d in p.datasets.values() for t in d.tasks} == {"arith", "arith_nll"}
        assert p.datasets["arith"].n_eval == 200 and p.eval.limit is None

    def test_the_random_down_proj_is_the_placement_draw_with_seed_0(self):
        from domlora.placement import _draw

        p = load_params(ROOT / "params.yaml", profile="scale_train")
        names = [f"model.layers.{i}.mlp.down_proj" for i in range(28)]  # Qwen2.5-1.5B: 28 layers
        (drawn,) = _draw(names, 1, 0)
        m = p.methods["random_down"]
        assert (m.placement, m.types, m.layers) == ("explicit", ["down_proj"], [int(drawn.split(".")[2])])
        assert p.methods["domlora"].placement == "dom"

    def test_ranks_and_rates_as_the_docs_state(self):
        p = load_params(ROOT / "params.yaml", profile="scale_train")
        got = {m: (p.train_config(m).rank, p.train_config(m).alpha, p.train_config(m).lr)
               for m in ("lora", "lora_r1", "domlora", "random_down")}
        assert got == {"lora": (64, 128, 5.0e-4), "lora_r1": (1, 2, 5.0e-3), "domlora": (64, 128, 5.0e-3),
                       "random_down": (64, 128, 5.0e-3)}
        assert p.train_config("domlora").max_steps == 40


def test_report_has_bootstrap_columns_and_the_three_backbones(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="scale")
    lay = Layout(tmp_path)
    boots = {"smol": (0.97, 0.55), "gemma": (0.41, 0.40), "qwen": (1.0, 0.88)}
    for m, (db, ab) in boots.items():
        for d in params.grid.probe_datasets:
            pd = lay.probe_dir(m, d)
            pd.mkdir(parents=True)
            (pd / "page.json").write_text(json.dumps(_page_doc(m, {"smol": 1, "gemma": 2, "qwen": 3}[m],
                                                               dom_boot=db, argmax_boot=ab)))
    out = write_report(params, lay)
    readme = (lay.reports / "README.md").read_text()
    assert "| dom bootstrap | argmax |" in readme and "| argmax bootstrap |" in readme
    qwen = next(ln for ln in readme.splitlines() if ln.startswith("| qwen | arith |"))
    assert "| 100% | `model.layers.3.mlp.down_proj` | 88% |" in qwen
    gemma = next(ln for ln in readme.splitlines() if ln.startswith("| Gemma-3-270M |"))
    assert gemma.endswith("| 20.0-20.0% | 60.0-60.0% | 41%-41% |")
    assert next(ln for ln in readme.splitlines() if ln.startswith("| Qwen2.5-Coder-1.5B-Instruct |"))
    rows = out["tables"]["dominant"]
    assert {r["model"] for r in rows} == {"smol", "gemma", "qwen"} and all("dom_bootstrap" in r for r in rows)


def test_report_without_bootstrap_shows_it_missing(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="ci")
    lay = Layout(tmp_path)
    doc = _page_doc("smol", 1, dom_boot=0, argmax_boot=0)
    del doc["bootstrap"]  # a page.json written before the probe stage computed it
    for d in params.grid.probe_datasets:
        lay.probe_dir("smol", d).mkdir(parents=True)
        (lay.probe_dir("smol", d) / "page.json").write_text(json.dumps(doc))
    write_report(params, lay)
    lines = (lay.reports / "README.md").read_text().splitlines()
    header = next(ln for ln in lines if ln.startswith("| Model | Probe set | dom module"))
    row = next(ln for ln in lines if ln.startswith("| smol | arith |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["dom bootstrap"] == "–" and cells["argmax bootstrap"] == "–"
    assert cells["share of all PAGE"] != "–"


def test_registry_keeps_the_bootstrap(tmp_path):
    path = tmp_path / "reg.json"
    record(_page_doc("embedded-qwen", 3, dom_boot=0.93, argmax_boot=0.5), model="embedded-qwen", config_hash="abc",
           path=path, data="arith")
    obs = load_registry(path)["entries"]["embedded-qwen@abc"]["observations"][0]
    assert obs["dominant_bootstrap"] == 0.93 and obs["argmax_bootstrap"] == 0.5


def test_probe_stage_writes_the_bootstrap(tiny_model_dir, chat_jsonl, tmp_path):
    from domlora.pipeline.stages.probe import probe

    doc = probe(model=str(tiny_model_dir), data=chat_jsonl, out_dir=tmp_path / "p", samples=6, max_length=64,
                nfn=False, activations=False, device="cpu")
    boot = json.loads((tmp_path / "p" / "page.json").read_text())["bootstrap"]
    assert boot["dom_stability"] == doc["bootstrap"]["dom_stability"] and boot["n_boot"] == 1000 and boot["n_samples"] == 6
    assert boot["dom"] == doc["dominant"] and boot["argmax"] == doc["argmax"]
    assert 0 < boot["dom_stability"] <= 1 and sum(boot["dom_counts"].values()) == 1000


def test_probe_refuses_weights_that_do_not_fit_before_loading(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    """On a machine without the memory for the weights (Qwen-1.5B: 7.1 GB in float32) the probe stage
    says what they need and what is free, and loads nothing."""
    import importlib

    from domlora.pipeline.stages.probe import probe
    from domlora.probes import budget

    probe_module = importlib.import_module("domlora.pipeline.stages.probe")

    monkeypatch.setattr(budget, "available_memory", lambda device: 1000)
    monkeypatch.setattr(probe_module, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match=r"the model's weights alone need 0.00 GiB and 0.00 GiB is free: refused "
                                          r"before loading; fix: free memory"):
        probe(model=str(tiny_model_dir), data=chat_jsonl, out_dir=tmp_path / "p", samples=4, max_length=64,
              device="cpu")
    assert not (tmp_path / "p").exists()

"""Registry of dominant modules: record, look up, reuse across tasks, re-probe on request."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from domlora.errors import ConfigError
from domlora.pipeline.registry import dominant_for, load_registry, lookup, placement_from_entry, record

D1, D2 = "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"


def _page(dom: str | None, data: str, argmax: str | None = None) -> dict:
    mods = {n: {"type": "down_proj", "layer": int(n.split(".")[2]), "PAGE": 1.0} for n in (D1, D2)}
    return {"model": "tiny", "data": data, "n_samples": 32, "dominant": dom, "argmax": argmax or dom,
            "dominant_share_total": 0.2, "dominant_share_type": 0.7, "alpha": 16.0, "rank": 8, "modules": mods}


def test_record_and_lookup(tmp_path):
    reg = tmp_path / "registry" / "dominant_modules.json"
    assert lookup("tiny", "h1", path=reg) is None
    e = record(_page(D1, "arith"), model="tiny", config_hash="h1", path=reg)
    assert e.dominant == D1 and e.stable and len(e.observations) == 1
    got = lookup("tiny", "h1", path=reg)
    assert got.dominant == D1 and got.observations[0]["data"] == "arith"
    assert got.observations[0]["dominant_layer"] == 1
    assert lookup("tiny", "other-hash", path=reg) is None
    assert lookup("other-name", "h1", path=reg) is None
    assert lookup("other-name", "h1", path=reg, match_config=True).dominant == D1
    assert json.loads(reg.read_text())["entries"]["tiny@h1"]["dominant"] == D1


def test_task_agreement_and_disagreement(tmp_path):
    reg = tmp_path / "r.json"
    record(_page(D1, "arith"), model="m", config_hash="h", path=reg)
    e = record(_page(D1, "code", argmax="x"), model="m", config_hash="h", path=reg)
    assert e.stable and len(e.observations) == 2
    e = record(_page(D2, "strings"), model="m", config_hash="h", path=reg)
    assert not e.stable and e.dominant == D1  # majority
    # recording a probe set again replaces its earlier observation
    e = record(_page(D2, "arith"), model="m", config_hash="h", path=reg)
    assert len(e.observations) == 3 and e.dominant == D2
    e = record(_page(D1, "arith"), model="m", config_hash="h", path=reg, replace=True)
    assert e.stable and len(e.observations) == 1


def test_dominant_for_probes_once(tmp_path):
    reg = tmp_path / "r.json"
    calls = []

    def probe():
        calls.append(1)
        return _page(D2, "arith")

    e, probed = dominant_for("m", "h", probe=probe, path=reg)
    assert probed and e.dominant == D2 and len(calls) == 1
    e, probed = dominant_for("m", "h", probe=probe, path=reg)
    assert not probed and len(calls) == 1
    e, probed = dominant_for("m", "h", probe=probe, path=reg, reprobe=True)
    assert probed and len(calls) == 2


def test_placement_from_entry(tmp_path):
    e = record(_page(D1, "arith"), model="m", config_hash="h", path=tmp_path / "r.json")
    pl = placement_from_entry(e, modules=_page(D1, "x")["modules"])
    assert pl.modules == [D1] and pl.strategy == "dom" and pl.evidence["source"] == "registry"
    with pytest.raises(ConfigError, match="no such module"):
        placement_from_entry(e, modules={"model.h.0.mlp.c_proj": {}})


def test_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        lookup("m", "h", path=bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a dominant-module registry"):
        load_registry(bad)
    with pytest.raises(ConfigError, match="no `dominant`"):
        record(_page(None, "x"), model="m", config_hash="h", path=tmp_path / "r.json")


def _record_one(args):
    path, i = args
    record(_page(D1, f"task{i}"), model="m", config_hash="h", path=path)


def test_concurrent_records_are_not_lost(tmp_path):
    reg = str(tmp_path / "r.json")
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_record_one, [(reg, i) for i in range(8)])
    e = lookup("m", "h", path=reg)
    assert sorted(o["data"] for o in e.observations) == sorted(f"task{i}" for i in range(8))


def test_cli(tiny_model, tiny_tokenizer, tmp_path, capsys):
    from domlora.cli import main
    from domlora.models import config_hash

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    page = tmp_path / "page.json"
    page.write_text(json.dumps(_page(D1, "arith")))
    reg = tmp_path / "reg.json"
    assert main(["registry", "--registry", str(reg), "lookup", "--model", str(folder)]) == 1
    assert main(["registry", "--registry", str(reg), "record", "--model", str(folder), "--probe", str(page)]) == 0
    capsys.readouterr()
    assert main(["registry", "--registry", str(reg), "lookup", "--model", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dominant"] == D1 and out["config_hash"] == config_hash(tiny_model)
    assert main(["registry", "--registry", str(reg), "record", "--model", str(folder), "--probe",
                 str(tmp_path / "missing.json")]) == 2

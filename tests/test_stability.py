"""Task stability across probe sets and bootstrap stability of dom / argmax."""
from __future__ import annotations

import json
import random

import pytest

from domlora.errors import ConfigError
from domlora.modules import Candidate
from domlora.probes.page import PageResult
from domlora.studies.stability import bootstrap_choice, compare_probes, spearman
from domlora.probes.summary import page_summary

TYPES = ("q_proj", "v_proj", "down_proj")


def _cands(layers: int = 4) -> list[Candidate]:
    return [Candidate(f"model.layers.{i}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}", i, t,
                      24 if t == "down_proj" else 16, 16) for i in range(layers) for t in TYPES]


def _doc(values: dict[str, float]) -> dict:
    cands = _cands()
    per = [[values.get(c.name, 1.0) for c in cands]]
    res = PageResult(candidates=cands, S={c.name: per[0][j] for j, c in enumerate(cands)}, per_sample=per,
                     alpha=16.0, rank=8, n_samples=1)
    return page_summary(res, model="tiny")


D1, D2 = "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"
V0 = "model.layers.0.self_attn.v_proj"


class TestCompare:
    def test_identical(self):
        doc = _doc({D1: 50.0, V0: 30.0})
        r = compare_probes({"a": doc, "b": json.loads(json.dumps(doc))}, k=3)
        p = r.pairs[0]
        assert p.argmax_agree and p.dom_agree and p.spearman == pytest.approx(1.0) and p.topk_overlap == 1.0
        assert r.to_dict()["all_dom_agree"]

    def test_same_dom_other_argmax(self):
        a = _doc({D1: 50.0, V0: 30.0})
        b = _doc({D1: 50.0, V0: 900.0})
        r = compare_probes({"code": a, "arith": b})
        p = r.pairs[0]
        assert p.dom_agree and not p.argmax_agree
        assert r.dom == {"code": D1, "arith": D1} and r.argmax["arith"] == V0
        assert r.dom_agreement == 1.0 and r.argmax_agreement == 0.0

    def test_reversed_ranking(self):
        cands = _cands()
        # S scaled by d_in so that PAGE (= S / d_in up to a constant) has exactly these ranks
        a = _doc({c.name: float(i + 1) * c.d_in for i, c in enumerate(cands)})
        b = _doc({c.name: float(len(cands) - i) * c.d_in for i, c in enumerate(cands)})
        r = compare_probes({"a": a, "b": b}, k=2)
        assert r.pairs[0].spearman == pytest.approx(-1.0)
        assert r.pairs[0].topk_overlap == 0.0 and not r.pairs[0].dom_agree

    def test_three_probes_pairs(self):
        docs = {t: _doc({D1: 9.0}) for t in ("x", "y", "z")}
        assert len(compare_probes(docs).pairs) == 3

    def test_bad_input(self):
        doc = _doc({})
        with pytest.raises(ConfigError, match="at least two"):
            compare_probes({"a": doc})
        other = dict(doc, modules={k.replace("layers", "h"): v for k, v in doc["modules"].items()})
        with pytest.raises(ConfigError, match="different architectures"):
            compare_probes({"a": doc, "b": other})
        with pytest.raises(ConfigError, match="PAGE table"):
            compare_probes({"a": doc, "b": {"model": "x"}})
        with pytest.raises(ConfigError):
            compare_probes({"a": doc, "b": doc}, k=0)

    def test_spearman_edge_cases(self):
        assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
        assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN
        with pytest.raises(ConfigError):
            spearman([1, 2], [1])


def _result(per_sample: list[list[float]]) -> PageResult:
    cands = _cands()
    n = len(per_sample)
    S = {c.name: sum(r[j] for r in per_sample) / n for j, c in enumerate(cands)}
    return PageResult(candidates=cands, S=S, per_sample=per_sample, alpha=16.0, rank=8, n_samples=n)


class TestBootstrap:
    def test_clear_winner_is_stable(self):
        cands = _cands()
        rng = random.Random(0)
        per = [[(100.0 if c.name == D1 else 1.0) * rng.uniform(0.5, 1.5) for c in cands] for _ in range(16)]
        r = bootstrap_choice(_result(per), n_boot=200)
        assert r.dom == D1 and r.argmax == D1
        assert r.dom_stability == 1.0 and r.argmax_stability == 1.0
        lo, hi = r.dom_share_ci
        assert 0.9 < lo <= hi < 1.0

    def test_tie_is_unstable_and_matches_summary(self):
        cands = _cands()
        rng = random.Random(1)
        per = [[(10.0 if c.name in (D1, D2) else 1.0) * rng.uniform(0.2, 1.8) for c in cands] for _ in range(12)]
        res = _result(per)
        r = bootstrap_choice(res, n_boot=400, seed=3)
        doc = page_summary(res, model="tiny")
        assert r.dom == doc["dominant"] and r.argmax == doc["argmax"]
        assert 0.2 < r.dom_stability < 0.95
        assert set(r.dom_counts) == {D1, D2} and sum(r.dom_counts.values()) == 400
        assert bootstrap_choice(res, n_boot=400, seed=3).dom_counts == r.dom_counts  # seeded

    def test_bad_input(self):
        res = _result([[1.0] * len(_cands())])
        with pytest.raises(ConfigError):
            bootstrap_choice(res, n_boot=0)
        res.per_sample = []
        with pytest.raises(ConfigError, match="per-sample"):
            bootstrap_choice(res)


def test_cli(tmp_path, capsys):
    from domlora.cli import main

    (tmp_path / "code").mkdir()
    (tmp_path / "arith").mkdir()
    (tmp_path / "code" / "page.json").write_text(json.dumps(_doc({D1: 50.0, V0: 900.0})))
    (tmp_path / "arith" / "page.json").write_text(json.dumps(_doc({D1: 50.0})))
    out = tmp_path / "stab.json"
    assert main(["stability", "--probe", str(tmp_path / "code" / "page.json"), "--probe",
                 f"math={tmp_path / 'arith' / 'page.json'}", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["labels"] == ["code", "math"] and doc["dom_agreement"] == 1.0 and doc["argmax_agreement"] == 0.0
    assert main(["stability", "--probe", str(tmp_path / "code" / "page.json")]) == 2

"""The forward-only `massive` predictor and the placement strategy that reads its massive.json."""
from __future__ import annotations

import json

import pytest
from conftest import chat_samples, make_massive_llama, make_tiny_llama

from domlora.errors import ConfigError
from domlora.placement import PlacementSpec, select
from domlora.probes.massive import RULES, massive_predict, massive_summary, predict_from_report
from domlora.samples import encode_samples

AT = 2
NAME = f"model.layers.{AT}.mlp.down_proj"


@pytest.fixture
def encoded(tiny_tokenizer):
    enc, _ = encode_samples(tiny_tokenizer, chat_samples(5), max_length=64)
    return enc


@pytest.fixture
def planted(tiny_tokenizer, encoded):
    model = make_massive_llama(len(tiny_tokenizer), layers=4, at=AT)
    pred, report = massive_predict(model, encoded)
    return model, pred, report


def _page_doc(dominant: str, layers: int = 4) -> dict:
    mods = {f"model.layers.{i}.mlp.down_proj": {"type": "down_proj", "layer": i, "d_in": 24, "d_out": 16,
                                                 "PAGE": 1.0} for i in range(layers)}
    mods[dominant]["PAGE"] = 5.0
    return {"model": "tiny", "dominant": dominant, "argmax": dominant, "modules": mods}


class TestPredictor:
    def test_every_rule_finds_the_planted_layer(self, planted):
        _, pred, report = planted
        assert pred.module == NAME and pred.layer == AT and pred.phenomenon and not pred.fallback
        assert pred.onset_layer == AT
        assert set(pred.alternatives) == set(RULES)
        assert all(v == NAME for v in pred.alternatives.values())
        for rule in RULES:
            assert predict_from_report(report, rule=rule).module == NAME
        ev = pred.evidence
        assert ev["residual_max_after"] > 100 * ev["residual_max_before"]
        assert ev["super_weight"]["aligned_with_input_peak"]

    def test_fallback_without_phenomenon(self, tiny_tokenizer, encoded, caplog):
        pred, report = massive_predict(make_tiny_llama(len(tiny_tokenizer)), encoded)
        assert not pred.phenomenon and pred.fallback and pred.onset_layer is None
        best = max(report.down_proj, key=lambda d: d.output_median_max)
        assert pred.module == best.name
        assert "falling back" in caplog.text

    def test_unknown_rule(self, planted, encoded):
        model, _, report = planted
        with pytest.raises(ConfigError, match="unknown rule"):
            predict_from_report(report, rule="biggest")
        with pytest.raises(ConfigError, match="unknown rule"):
            massive_predict(model, encoded, rule="biggest")

    def test_empty_probe_set(self, planted):
        with pytest.raises(ConfigError, match="empty"):
            massive_predict(planted[0], [])

    def test_no_backward(self, planted, encoded):
        model = planted[0]
        massive_predict(model, encoded)
        assert all(p.grad is None for p in model.parameters())


class TestMassiveJsonAndPlacement:
    def test_doc_and_select(self, planted):
        _, pred, report = planted
        doc = massive_summary(pred, report, model="tiny", config_hash="abc")
        doc = json.loads(json.dumps(doc))  # what a reader of massive.json gets
        assert doc["kind"] == "massive" and doc["predicted"] == NAME and doc["layer"] == AT
        assert NAME in doc["modules"]
        pl = select(PlacementSpec("massive"), activations=doc)
        assert pl.strategy == "massive" and pl.modules == [NAME] and pl.model == "tiny"
        assert pl.evidence["phenomenon"] is True and pl.evidence["rule"] == "onset"
        assert "agrees_with_dom" not in pl.evidence

    def test_agreement_with_page(self, planted):
        _, pred, report = planted
        doc = massive_summary(pred, report, model="tiny")
        agree = select(PlacementSpec("massive"), probe=_page_doc(NAME), activations=doc)
        assert agree.modules == [NAME] and agree.evidence["agrees_with_dom"] is True
        other = "model.layers.0.mlp.down_proj"
        differ = select(PlacementSpec("massive"), probe=_page_doc(other), activations=doc)
        assert differ.modules == [NAME] and differ.evidence["agrees_with_dom"] is False
        assert differ.evidence["page_dominant"] == other

    def test_other_strategies_unchanged(self, planted):
        _, pred, report = planted
        doc = massive_summary(pred, report, model="tiny")
        page = _page_doc("model.layers.1.mlp.down_proj")
        assert select(PlacementSpec("dom"), probe=page, activations=doc).modules == ["model.layers.1.mlp.down_proj"]

    def test_bad_documents(self, planted):
        _, pred, report = planted
        doc = massive_summary(pred, report, model="tiny")
        with pytest.raises(ConfigError, match="needs the forward-only prediction"):
            select(PlacementSpec("massive"), probe=_page_doc(NAME))
        with pytest.raises(ConfigError, match="not a massive.json"):
            select(PlacementSpec("massive"), probe=_page_doc(NAME), activations=_page_doc(NAME))
        # written for a deeper model: its module does not exist in this one
        foreign = dict(doc, predicted="model.layers.30.mlp.down_proj", model="big")
        with pytest.raises(ConfigError, match="not a module of this model"):
            select(PlacementSpec("massive"), probe=_page_doc(NAME), activations=foreign)

"""Placement strategies give exact module names, and PEFT wraps exactly those (no suffix surprises)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import chat_samples, make_tiny_llama
from domlora.errors import ConfigError
from domlora.modules import ATTN_TYPES, FFN_TYPES, find_candidates
from domlora.placement import STRATEGIES, Placement, PlacementSpec, dominant_module, select
from domlora.probes.nfn import nfn_probe
from domlora.probes.page import page_probe
from domlora.samples import encode_samples
from domlora.probes.summary import nfn_summary, page_summary

N_LAYERS = 12  # >= 12 so that layer 1 could collide with layer 11 under suffix matching


@pytest.fixture(scope="module")
def deep():
    """A 12-layer tiny Llama with its page.json and nfn.json documents."""
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), layers=N_LAYERS, hidden=8, inter=12)
    encoded, _ = encode_samples(tok, chat_samples(4), max_length=500)
    page = page_summary(page_probe(model, encoded, batch_size=4), model="tiny12")
    nfn = nfn_summary(nfn_probe(model, encoded), model="tiny12")
    return model, page, nfn


def wrapped_by_peft(model, names: list[str]) -> set[str]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=names))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def place(doc, nfn=None, **spec):
    return select(PlacementSpec(**spec), probe=doc, nfn=nfn)


def names_where(doc, pred) -> set[str]:
    return {n for n, m in doc["modules"].items() if pred(m)}


# (spec, expected module set as a predicate over the page.json module table)
EXPLICIT_CASES = [
    (dict(layers=(1,), types=("down_proj",)), lambda m: m["layer"] == 1 and m["type"] == "down_proj"),
    (dict(layers=(11,), types=("down_proj",)), lambda m: m["layer"] == 11 and m["type"] == "down_proj"),
    (dict(layers=(-1,), types=("down_proj",)), lambda m: m["layer"] == N_LAYERS - 1 and m["type"] == "down_proj"),
    (dict(layers=(-12, 10), types=("up_proj", "gate_proj")),
     lambda m: m["layer"] in (0, 10) and m["type"] in ("up_proj", "gate_proj")),
    (dict(layers=(1,), types=("ffn_all",)), lambda m: m["layer"] == 1 and m["type"] in FFN_TYPES),
    (dict(layers=(1,), types=("attn_all",)), lambda m: m["layer"] == 1 and m["type"] in ATTN_TYPES),
    (dict(layers=(1,), types=("gate_proj",)), lambda m: m["layer"] == 1 and m["type"] == "gate_proj"),
]


class TestPeftWrapsExactlyThePlacement:
    @pytest.mark.parametrize("spec", [dict(strategy="dom"), dict(strategy="page_argmax"),
                                      dict(strategy="page_topk", k=5), dict(strategy="all"),
                                      dict(strategy="plop", k=3), dict(strategy="plop_inverse", k=2),
                                      dict(strategy="types", types=("down_proj", "v_proj")),
                                      dict(strategy="random", k=7, seed=3)])
    def test_strategy(self, deep, spec):
        model, page, nfn = deep
        placement = place(page, nfn, **spec)
        assert placement.modules and len(set(placement.modules)) == len(placement.modules)
        assert set(placement.modules) <= set(page["modules"])
        assert wrapped_by_peft(model, placement.modules) == set(placement.modules)

    @pytest.mark.parametrize("spec,expected", EXPLICIT_CASES)
    def test_explicit(self, deep, spec, expected):
        model, page, _ = deep
        placement = place(page, strategy="explicit", **spec)
        assert set(placement.modules) == names_where(page, expected)
        assert wrapped_by_peft(model, placement.modules) == set(placement.modules)

    def test_layer_1_is_not_layer_11(self, deep):
        model, page, _ = deep
        placement = place(page, strategy="explicit", layers=(1,), types=("down_proj",))
        assert placement.modules == ["model.layers.1.mlp.down_proj"]
        assert wrapped_by_peft(model, placement.modules) == {"model.layers.1.mlp.down_proj"}

    def test_gpt2_down_proj_is_not_attention_c_proj(self, tiny_tokenizer):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=N_LAYERS,
                                           n_head=4, n_positions=512)).eval().requires_grad_(False)
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(2), max_length=500)
        page = page_summary(page_probe(model, encoded), model="gpt2")
        assert page["dominant"].endswith(".mlp.c_proj")
        for spec in (dict(strategy="dom"), dict(strategy="types", types=("down_proj",)),
                     dict(strategy="explicit", layers=(1,), types=("o_proj",))):
            placement = place(page, **spec)
            assert wrapped_by_peft(model, placement.modules) == set(placement.modules)
        downs = place(page, strategy="types", types=("down_proj",)).modules
        assert downs == [f"transformer.h.{i}.mlp.c_proj" for i in range(N_LAYERS)]


class TestRules:
    def test_dom_is_the_largest_down_proj(self, deep):
        _, page, _ = deep
        p = place(page, strategy="dom")
        downs = {n: m["PAGE"] for n, m in page["modules"].items() if m["type"] == "down_proj"}
        assert p.modules == [max(downs, key=downs.get)] == [page["dominant"]]
        ev = p.evidence
        assert ev["argmax"] == page["argmax"]
        assert ev["argmax_differs"] == (page["argmax"] != page["dominant"])
        assert ev["modules"][p.modules[0]]["PAGE"] == page["modules"][p.modules[0]]["PAGE"]
        assert ev["modules"][p.modules[0]]["rank"] >= 1

    @pytest.mark.parametrize("winner,differs", [("model.layers.4.self_attn.q_proj", True),
                                                ("model.layers.7.mlp.down_proj", False)])
    def test_page_argmax_says_when_it_differs_from_dom(self, deep, winner, differs):
        _, page, _ = deep
        doc = copy.deepcopy(page)
        doc["modules"][winner]["PAGE"] = 10 * max(m["PAGE"] for m in doc["modules"].values())
        p = place(doc, strategy="page_argmax")
        assert p.modules == [winner]
        assert p.evidence["differs_from_dom"] is differs
        assert p.evidence["dom"] == dominant_module(doc["modules"])
        assert place(doc, strategy="dom").evidence["argmax_differs"] is differs

    def test_page_topk_in_rank_order(self, deep):
        _, page, _ = deep
        p = place(page, strategy="page_topk", k=6)
        ranked = sorted(page["modules"], key=lambda n: -page["modules"][n]["PAGE"])
        assert p.modules == ranked[:6]
        assert [p.evidence["modules"][n]["rank"] for n in p.modules] == list(range(1, 7))

    def test_all_is_every_candidate(self, deep):
        model, page, _ = deep
        assert place(page, strategy="all").modules == [c.name for c in find_candidates(model)]

    @pytest.mark.parametrize("inverse", [False, True])
    def test_plop_picks_types_by_nfn(self, deep, inverse):
        _, page, nfn = deep
        p = place(page, nfn, strategy="plop_inverse" if inverse else "plop", k=3)
        ts = nfn["type_scores"]
        chosen = sorted(ts, key=ts.get, reverse=inverse)[:3]
        assert p.evidence["types"] == chosen
        assert set(p.modules) == names_where(page, lambda m: m["type"] in chosen)

    def test_types_in_every_layer(self, deep):
        _, page, _ = deep
        p = place(page, strategy="types", types=("ffn_all",))
        assert set(p.modules) == names_where(page, lambda m: m["type"] in FFN_TYPES)
        assert len(p.modules) == 3 * N_LAYERS

    def test_random_is_seeded(self, deep):
        _, page, _ = deep
        a = place(page, strategy="random", k=5, seed=11).modules
        assert a == place(page, strategy="random", k=5, seed=11).modules
        others = {tuple(place(page, strategy="random", k=5, seed=s).modules) for s in range(12, 20)}
        assert len(others | {tuple(a)}) > 1
        assert len(set(a)) == 5

    def test_explicit_evidence_carries_scores(self, deep):
        _, page, _ = deep
        p = place(page, strategy="explicit", layers=(2,), types=("down_proj",))
        assert p.evidence["layers"] == [2] and p.evidence["types"] == ["down_proj"]
        assert p.evidence["modules"]["model.layers.2.mlp.down_proj"]["PAGE"] > 0

    def test_works_from_a_module_table_alone(self, deep):
        model, _, _ = deep
        table = {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out}
                 for c in find_candidates(model)}
        p = select(PlacementSpec(strategy="explicit", layers=(3,), types=("v_proj",)), modules=table)
        assert p.modules == ["model.layers.3.self_attn.v_proj"]


class TestErrors:
    def test_unknown_strategy_lists_valid_ones(self):
        with pytest.raises(ConfigError) as info:
            PlacementSpec(strategy="best")
        for name in ("dom", "page_argmax", "page_topk", "all", "plop", "plop_inverse", "types", "explicit",
                     "random"):
            assert name in str(info.value)
        assert set(STRATEGIES) >= {"dom", "random"}

    @pytest.mark.parametrize("strategy", ["page_topk", "random"])
    def test_k_larger_than_candidates(self, deep, strategy):
        _, page, _ = deep
        with pytest.raises(ConfigError, match=r"k=85 is larger than the 84 candidate modules"):
            place(page, strategy=strategy, k=85)

    def test_plop_k_larger_than_types(self, deep):
        _, page, nfn = deep
        with pytest.raises(ConfigError, match="larger than the 7 module types"):
            place(page, nfn, strategy="plop", k=8)

    def test_k_below_one(self):
        with pytest.raises(ConfigError, match="k must be >= 1"):
            PlacementSpec(strategy="page_topk", k=0)

    def test_plop_without_nfn(self, deep):
        _, page, _ = deep
        with pytest.raises(ConfigError, match="--nfn"):
            place(page, strategy="plop")

    def test_page_strategy_without_probe(self, deep):
        _, _, nfn = deep
        with pytest.raises(ConfigError, match="--probe"):
            select(PlacementSpec(strategy="dom"), nfn=nfn)

    def test_layer_out_of_range(self, deep):
        _, page, _ = deep
        for layer in (12, -13):
            with pytest.raises(ConfigError, match="out of range: this model has layers 0..11"):
                place(page, strategy="explicit", layers=(layer,), types=("down_proj",))

    def test_unknown_type(self, deep):
        _, page, _ = deep
        with pytest.raises(ConfigError, match="unknown module type 'mlp'"):
            place(page, strategy="types", types=("mlp",))

    def test_explicit_needs_layers_and_types(self, deep):
        _, page, _ = deep
        with pytest.raises(ConfigError, match="--layers and --types"):
            place(page, strategy="explicit", types=("down_proj",))

    def test_dom_without_down_proj(self, deep):
        _, page, _ = deep
        doc = copy.deepcopy(page)
        doc["modules"] = {n: m for n, m in doc["modules"].items() if m["type"] != "down_proj"}
        with pytest.raises(ConfigError, match="page_argmax"):
            place(doc, strategy="dom")

    def test_no_module_table(self):
        with pytest.raises(ConfigError, match="no module table"):
            select(PlacementSpec(strategy="all"))


class TestPlacementJson:
    def test_round_trip(self, deep):
        _, page, _ = deep
        p = place(page, strategy="page_topk", k=3)
        d = json.loads(json.dumps(p.to_dict()))
        assert d["n_modules"] == 3 and d["strategy"] == "page_topk" and d["model"] == "tiny12"
        back = Placement.from_dict(d)
        assert back.modules == p.modules and back.evidence == p.evidence

    def test_from_dict_needs_modules(self):
        with pytest.raises(ConfigError, match="non-empty `modules`"):
            Placement.from_dict({"strategy": "dom", "modules": []})

"""PAGE at any budget: page_budget and page_rank, their refusals, and adapters that load with plain PEFT."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import chat_samples, make_tiny_llama, make_tiny_tokenizer
from domlora.errors import ConfigError
from domlora.placement import (Placement, PlacementSpec, allocate_ranks, draw_per_seed, lora_params, select)
from domlora.probes import page_probe
from domlora.probes.summary import page_summary
from domlora.samples import encode_samples

LAYERS = 4


@pytest.fixture(scope="module")
def probed():
    """A 4-layer tiny Llama (hidden 16, inter 24) and its page.json."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), layers=LAYERS)
    encoded, _ = encode_samples(tok, chat_samples(4), max_length=300)
    return model, page_summary(page_probe(model, encoded, batch_size=4), model="tiny4")


def _cost(doc, name, rank):
    m = doc["modules"][name]
    return rank * (m["d_in"] + m["d_out"])


def _by_page(doc):
    return sorted(doc["modules"], key=lambda n: -doc["modules"][n]["PAGE"])


class TestPageBudget:
    def test_modules_in_page_order_until_the_budget_is_spent(self, probed):
        _, doc = probed
        order = _by_page(doc)
        budget = sum(_cost(doc, n, 4) for n in order[:5]) + 10  # the 6th module no longer fits
        pl = select(PlacementSpec("page_budget", rank=4, budget=budget), probe=doc)
        assert set(pl.modules) == set(order[:5])
        assert pl.evidence["lora_params"] == lora_params(doc["modules"], pl.modules, 4) <= budget
        assert pl.rank_pattern is None  # one rank: plain target_modules

    def test_fraction_is_of_vanilla_lora_at_the_same_rank(self, probed):
        _, doc = probed
        vanilla = lora_params(doc["modules"], doc["modules"], 8)
        a = select(PlacementSpec("page_budget", rank=8, budget_fraction=0.25), probe=doc)
        b = select(PlacementSpec("page_budget", rank=8, budget=0.25 * vanilla), probe=doc)
        assert a.modules == b.modules and a.evidence["vanilla_lora_params"] == vanilla
        assert 0.25 * vanilla - max(_cost(doc, n, 8) for n in doc["modules"]) < a.evidence["lora_params"] <= 0.25 * vanilla


class TestPageRank:
    def test_total_rank_spread_in_proportion_to_page(self, probed):
        _, doc = probed
        pl = select(PlacementSpec("page_rank", rank=8, alpha=16, total_rank=60), probe=doc)
        ranks = pl.rank_pattern
        assert set(ranks) == set(pl.modules) == set(doc["modules"]) and sum(ranks.values()) == 60
        assert min(ranks.values()) >= 1
        order = _by_page(doc)
        assert ranks[order[0]] == max(ranks.values()) and ranks[order[0]] > ranks[order[-1]]
        assert all(pl.alpha_pattern[n] == 2.0 * r for n, r in ranks.items())  # alpha / r kept at 16 / 8

    def test_a_parameter_budget_buys_the_largest_total_rank_that_fits(self, probed):
        _, doc = probed
        budget = 0.1 * lora_params(doc["modules"], doc["modules"], 8)
        pl = select(PlacementSpec("page_rank", rank=8, budget=budget, max_modules=6), probe=doc)
        spent = lora_params(doc["modules"], pl.modules, rank_pattern=pl.rank_pattern)
        assert len(pl.modules) == 6 and set(pl.modules) == set(_by_page(doc)[:6])
        assert spent == pl.evidence["lora_params"] <= budget
        caps = {n: min(doc["modules"][n]["d_in"], doc["modules"][n]["d_out"]) for n in pl.modules}
        pages = {n: doc["modules"][n]["PAGE"] for n in pl.modules}
        one_more = allocate_ranks(pages, pl.evidence["total_rank"] + 1, caps)
        assert lora_params(doc["modules"], pl.modules, rank_pattern=one_more) > budget

    def test_allocation_floor_and_caps(self):
        assert allocate_ranks({"a": 10, "b": 1, "c": 0.01}, 10, {"a": 5}) == {"a": 5, "b": 4, "c": 1}
        assert allocate_ranks({"a": 1, "b": 1, "c": 1}, 7) == {"a": 3, "b": 2, "c": 2}
        assert allocate_ranks({"a": 100, "b": 1, "c": 1}, 3) == {"a": 1, "b": 1, "c": 1}


class TestRefusals:
    @pytest.mark.parametrize("kw, match", [
        (dict(strategy="page_budget", budget=1e5, budget_fraction=0.1), "both in parameters .* fix: give one"),
        (dict(strategy="page_rank", total_rank=3, max_modules=5), r"total rank 3 is below its 5 modules.*fix"),
        (dict(strategy="page_rank", total_rank=10, budget=1e4), "total rank and a parameter budget; fix"),
        (dict(strategy="dom", budget=1e5), "'dom' takes no budget .* fix"),
        (dict(strategy="page_budget"), "needs a budget in parameters .* fix"),
        (dict(strategy="page_budget", budget_fraction=1.5), r"in \(0, 1\].*fix"),
    ])
    def test_before_any_table(self, kw, match):
        with pytest.raises(ConfigError, match=match):
            PlacementSpec(**kw)

    def test_budget_smaller_than_one_module(self, probed):
        _, doc = probed
        with pytest.raises(ConfigError, match=r"smaller than one module at rank 8 .* fix: budget >= "):
            select(PlacementSpec("page_budget", rank=8, budget=50), probe=doc)

    def test_budget_larger_than_the_projections(self, probed):
        _, doc = probed
        weights = sum(m["d_in"] * m["d_out"] for m in doc["modules"].values())
        for strategy in ("page_budget", "page_rank"):
            with pytest.raises(ConfigError, match="larger than the model's projections.*fix"):
                select(PlacementSpec(strategy, rank=4, budget=weights + 1), probe=doc)
        with pytest.raises(ConfigError, match="more than every projection at rank 4.*fix: strategy `all`"):
            select(PlacementSpec("page_budget", rank=4, budget=lora_params(doc["modules"], doc["modules"], 4) + 1),
                   probe=doc)

    def test_page_rank_total_below_the_module_count(self, probed):
        _, doc = probed
        n = len(doc["modules"])
        with pytest.raises(ConfigError, match=rf"total rank 5 is below its {n} modules.*fix: total_rank >= {n}"):
            select(PlacementSpec("page_rank", total_rank=5), probe=doc)
        with pytest.raises(ConfigError, match="smaller than one rank per module.*fix"):
            select(PlacementSpec("page_rank", rank=4, budget=100), probe=doc)


def test_page_rank_adapter_round_trips_through_plain_peft(probed, tmp_path):
    """The rank_pattern / alpha_pattern adapter saves and loads with PEFT alone, ranks and outputs intact."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, doc = probed
    pl = select(PlacementSpec("page_rank", rank=4, alpha=8, total_rank=40, max_modules=7), probe=doc)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=pl.modules, **pl.lora_kwargs())
    torch.manual_seed(0)
    peft_model = get_peft_model(make_tiny_llama(model.config.vocab_size, layers=LAYERS), cfg)
    with torch.no_grad():  # a non-zero B, so that the adapter changes the outputs
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    shapes = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0]
              for n, p in peft_model.named_parameters() if n.endswith("lora_A.default.weight")}
    assert shapes == pl.rank_pattern
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == pl.evidence["lora_params"]
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == pl.rank_pattern
    loaded = PeftModel.from_pretrained(make_tiny_llama(model.config.vocab_size, layers=LAYERS), tmp_path / "adapter")
    got = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0]
           for n, p in loaded.named_parameters() if n.endswith("lora_A.default.weight")}
    assert got == pl.rank_pattern
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)


def test_train_honours_the_rank_pattern(probed, tmp_path, tiny_checkpoint):
    from domlora.train import TrainConfig, train

    model, doc = probed
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in chat_samples(6)))
    table = {n: m for n, m in doc["modules"].items() if m["layer"] < 3}  # the checkpoint has 3 layers
    pl = select(PlacementSpec("page_rank", rank=4, total_rank=30, max_modules=5), probe={"modules": table})
    rec = train(model=str(tiny_checkpoint), train_data=data, placement=pl.to_dict(), out_dir=tmp_path / "run",
                cfg=TrainConfig(rank=4, alpha=8, max_steps=1, batch_size=2, grad_accum=1, max_length=64, save_every=0,
                                gradient_checkpointing=False))
    assert rec["trainable_params"] == lora_params(table, pl.modules, rank_pattern=pl.rank_pattern)
    assert rec["placement"]["rank_pattern"] == pl.rank_pattern
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pl.rank_pattern and saved["alpha_pattern"] == pl.alpha_pattern


def test_random_draws_per_training_seed():
    table = {f"model.layers.{i}.mlp.down_proj": {"type": "down_proj", "layer": i} for i in range(30)}
    pl = draw_per_seed(PlacementSpec("random", k=2), [0, 1, 2], modules=table)
    draws = {s: pl.for_seed(s).modules for s in (0, 1, 2)}
    assert pl.modules == draws[0] and len({tuple(d) for d in draws.values()}) == 3
    assert draws[1] == select(PlacementSpec("random", k=2, seed=1), modules=table).modules
    again = Placement.from_dict(json.loads(json.dumps(pl.to_dict())))
    assert again.for_seed(2).modules == draws[2]
    assert again.for_seed(7).modules == select(PlacementSpec("random", k=2, seed=7), modules=table).modules


class TestApiAndCli:
    def test_dominant_lora_config_at_a_budget(self, tiny_model, tiny_tokenizer, chat_jsonl):
        from peft import LoraConfig

        from domlora import api

        cfg = api.dominant_lora_config(tiny_model, tiny_tokenizer, chat_jsonl, r=4, lora_alpha=8, samples=4,
                                       max_length=300, strategy="page_rank", budget_fraction=0.3)
        assert isinstance(cfg, LoraConfig) and set(cfg.rank_pattern) == set(cfg.target_modules)
        cfg = api.dominant_lora_config(tiny_model, tiny_tokenizer, chat_jsonl, r=4, lora_alpha=8, samples=4,
                                       max_length=300, strategy="page_budget", budget=500)
        assert 1 <= len(cfg.target_modules) and not cfg.rank_pattern

    def test_both_units_refused_before_the_probe(self, tiny_model, tiny_tokenizer, chat_jsonl, monkeypatch):
        from domlora import api

        monkeypatch.setattr(api, "probe_page", lambda *a, **k: pytest.fail("probed before checking the budget"))
        with pytest.raises(ConfigError, match="give one of them"):
            api.dominant_lora_config(tiny_model, tiny_tokenizer, chat_jsonl, strategy="page_budget", budget=3e6,
                                     budget_fraction=0.16)

    def test_cli(self, probed, tmp_path, capsys):
        from domlora.cli import main

        _, doc = probed
        probe = tmp_path / "page.json"
        probe.write_text(json.dumps(doc))
        out = tmp_path / "pl.json"
        assert main(["select", "--probe", str(probe), "--strategy", "page_budget", "--budget", "2e3", "--rank", "8",
                     "--out", str(out)]) == 0
        written = json.loads(out.read_text())
        assert written["evidence"]["lora_params"] <= 2000 and json.loads(capsys.readouterr().out)["lora_params"]
        assert main(["select", "--probe", str(probe), "--strategy", "page_rank", "--total-rank", "50",
                     "--out", str(out)]) == 0
        assert sum(json.loads(out.read_text())["rank_pattern"].values()) == 50
        assert main(["select", "--probe", str(probe), "--strategy", "dom", "--budget", "3e6", "--out", str(out)]) == 2
        assert "apply to page_budget and page_rank" in capsys.readouterr().err
        assert main(["select", "--probe", str(probe), "--strategy", "page_budget", "--budget", "3e6",
                     "--budget-fraction", "0.1", "--out", str(out)]) == 2
        assert "give one of them" in capsys.readouterr().err

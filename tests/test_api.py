"""The Python API: probe_page / place / dominant_lora_config on a user's own model and data."""
from __future__ import annotations

import pytest

from conftest import chat_samples, make_tiny_llama
from domlora import api
from domlora.errors import DataError
from domlora.placement import PlacementSpec, select


def wrapped(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_dominant_lora_config_targets_exactly_the_dom_module(tiny_model, tiny_tokenizer, chat_jsonl):
    from peft import LoraConfig, get_peft_model

    config = api.dominant_lora_config(tiny_model, tiny_tokenizer, chat_jsonl, r=4, lora_alpha=8, samples=6,
                                      max_length=300)
    assert isinstance(config, LoraConfig)
    doc = api.probe_page(tiny_model, tiny_tokenizer, chat_jsonl, samples=6, max_length=300, alpha=8, rank=4)
    dom = select(PlacementSpec(strategy="dom"), probe=doc).modules
    assert dom == [doc["dominant"]]
    assert set(config.target_modules) == set(dom)
    assert config.r == 4 and config.lora_alpha == 8 and config.lora_dropout == 0.0
    peft_model = get_peft_model(tiny_model, config)
    assert wrapped(peft_model) == set(dom)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{dom[0]}.lora_{ab}.default.weight" for ab in "AB"}


def test_on_a_trainable_model_from_pretrained(tiny_tokenizer, chat_jsonl):
    # models straight from from_pretrained require grad; the probe must neither fail nor leave .grad behind
    model = make_tiny_llama(len(tiny_tokenizer)).requires_grad_(True).train()
    config = api.dominant_lora_config(model, tiny_tokenizer, chat_jsonl, r=2, lora_alpha=4, max_length=300)
    assert len(config.target_modules) == 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training


def test_extra_lora_kwargs_and_other_strategies(tiny_model, tiny_tokenizer, chat_jsonl):
    config = api.dominant_lora_config(tiny_model, tiny_tokenizer, chat_jsonl, r=2, lora_alpha=4, max_length=300,
                                      strategy="page_topk", k=3, use_dora=True, lora_dropout=0.1)
    assert len(config.target_modules) == 3 and config.use_dora and config.lora_dropout == 0.1


def test_probe_page_from_a_list_of_samples(tiny_model, tiny_tokenizer):
    doc = api.probe_page(tiny_model, tiny_tokenizer, chat_samples(5), samples=3, max_length=300,
                         model_name="mine")
    assert doc["model"] == "mine" and doc["n_samples"] == 3
    assert doc["samples"]["n_read"] == 3
    assert doc["modules"][doc["dominant"]]["type"] == "down_proj"


def test_place_returns_exact_names(tiny_model, tiny_tokenizer, chat_jsonl):
    placement = api.place(tiny_model, tiny_tokenizer, chat_jsonl, strategy="page_argmax", max_length=300)
    names = {n for n, _ in tiny_model.named_modules()}
    assert placement.strategy == "page_argmax" and len(placement.modules) == 1
    assert placement.modules[0] in names


def test_bad_samples_in_a_list(tiny_model, tiny_tokenizer):
    with pytest.raises(DataError, match="sample 1: no assistant turn"):
        api.probe_page(tiny_model, tiny_tokenizer, [chat_samples(1)[0], {"messages": [{"role": "user",
                                                                                       "content": "hi"}]}])


def test_exported_from_the_package():
    import domlora

    assert domlora.dominant_lora_config is api.dominant_lora_config

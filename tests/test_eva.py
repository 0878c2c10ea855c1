"""EVA initialisation through TrainConfig: PEFT's data-driven A and rank redistribution before training."""
from __future__ import annotations

import json

import pytest

from conftest import chat_samples, tiny_loaded
from domlora.errors import ConfigError
from domlora.modules import find_candidates
from domlora.train.config import TrainConfig, TrainRecord
from domlora.train.loop import train


def _cfg(**kw):
    base = dict(rank=2, alpha=4, lr=1e-3, max_steps=2, batch_size=2, grad_accum=1, max_length=128,
                gradient_checkpointing=False, save_every=0, lora_init="eva", eva_samples=8, eva_batch_size=8)
    return TrainConfig(**(base | kw))


def test_train_with_eva_records_the_ranks_and_saves_a_loadable_adapter(tmp_path, chat_jsonl, tiny_tokenizer):
    import torch

    from domlora.adapters.variants import apply_adapter

    loaded = tiny_loaded(tiny_tokenizer)
    base = tiny_loaded(tiny_tokenizer).model  # the same weights, untouched
    names = [c.name for c in find_candidates(loaded.model)]
    doc = train(model=loaded, train_data=chat_jsonl, placement=names, out_dir=tmp_path / "run", cfg=_cfg())
    init = doc["lora_init"]
    assert init["method"] == "eva" and set(init["ranks"]) == set(names)
    assert sum(init["ranks"].values()) == 2 * len(names)  # the rank budget, redistributed
    shapes = {c.name: c.d_in + c.d_out for c in find_candidates(base)}
    assert doc["trainable_params"] == sum(r * shapes[n] for n, r in init["ranks"].items())
    rec = TrainRecord.read(tmp_path / "run" / "train_metrics.json")
    assert rec.config["lora_init"] == "eva" and rec.lora_init == init
    # the saved adapter (EVA's per-module ranks in rank_pattern) reproduces the trained model
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "eva"
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits
        got = apply_adapter(base, tmp_path / "run" / "adapter")(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5)


def test_eva_a_is_the_top_singular_vectors_of_the_inputs(tiny_tokenizer):
    """After the init, A spans the leading principal directions of its module's inputs (PEFT's EVA); B is 0."""
    from domlora.adapters.variants import attach, init_eva
    from domlora.samples import encode_samples
    from peft import EvaConfig

    loaded = tiny_loaded(tiny_tokenizer)
    name = "model.layers.1.mlp.down_proj"
    model = attach(loaded.model, [name], variant="lora", rank=2, alpha=4, init_lora_weights="eva",
                   eva_config=EvaConfig(rho=1.0))
    enc, _ = encode_samples(tiny_tokenizer, chat_samples(8), max_length=128)
    out = init_eva(model, enc, batch_size=8, pad_id=tiny_tokenizer.pad_token_id)
    assert out["ranks"] == {name: 2}  # one module, rho = 1: nothing to redistribute
    layer = dict(model.named_modules())[f"base_model.model.{name}"]
    assert float(layer.lora_B["default"].weight.detach().abs().max()) == 0.0
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_bad_eva_settings(tmp_path, chat_jsonl, tiny_tokenizer):
    with pytest.raises(ConfigError, match="lora_init"):
        _cfg(variant="dora")
    with pytest.raises(ConfigError, match="lora_init"):
        _cfg(variant="lora", layer_sampling="ist")
    names = [c.name for c in find_candidates(tiny_loaded(tiny_tokenizer).model)]
    with pytest.raises(ConfigError, match="input features"):
        train(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=names, out_dir=tmp_path / "r",
              cfg=_cfg(rank=16))


def test_too_few_target_tokens_per_batch():
    import torch

    from domlora.peers import check_eva

    labels = torch.full((2, 10), -100)
    labels[:, -3:] = 7  # 6 target tokens in the batch
    with pytest.raises(ConfigError, match="eva_batch_size"):
        check_eva([{"labels": labels}], rank=4, rho=2.0, min_d_in=16)
    check_eva([{"labels": labels}], rank=3, rho=2.0, min_d_in=16)

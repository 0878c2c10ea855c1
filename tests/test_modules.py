"""Candidate discovery on tiny models of every supported architecture, built from config (no download)."""
from __future__ import annotations

import pytest
import torch

from domlora.errors import ModelError
from domlora.modules import PAPER_TYPES, TYPES, find_candidates, num_layers, types_present

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 16, 24, 2, 4, 2, 8
COMMON = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)

# model_type -> (config kwargs, expected {type: (d_in, d_out)} per layer)
LLAMA_LIKE = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV_HEADS * HIDDEN // HEADS),
              "v_proj": (HIDDEN, KV_HEADS * HIDDEN // HEADS), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
# explicit head_dim: q is heads * head_dim wide, k/v kv_heads * head_dim
HEAD_DIM_LIKE = LLAMA_LIKE | {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
                              "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN)}
ARCHS = {
    "llama": (COMMON, LLAMA_LIKE),
    "qwen2": (COMMON, LLAMA_LIKE),
    "qwen3": (COMMON | {"head_dim": HEAD_DIM}, HEAD_DIM_LIKE),
    "mistral": (COMMON, LLAMA_LIKE),
    "gemma": (COMMON | {"head_dim": HEAD_DIM}, HEAD_DIM_LIKE),
    "gemma2": (COMMON | {"head_dim": HEAD_DIM}, HEAD_DIM_LIKE),
    "gemma3_text": (COMMON | {"head_dim": HEAD_DIM}, HEAD_DIM_LIKE),
    # fused projections: qkv_proj = q + k + v rows, gate_up_proj = gate + up rows
    "phi3": (COMMON | {"pad_token_id": 0, "num_key_value_heads": HEADS},
             {"qkv_proj": (HIDDEN, 3 * HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_up_proj": (HIDDEN, 2 * INTER), "down_proj": (INTER, HIDDEN)}),
    # Conv1D stores its weight d_in x d_out; c_fc is 4 * n_embd wide by default
    "gpt2": (dict(vocab_size=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64),
             {"qkv_proj": (HIDDEN, 3 * HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "up_proj": (HIDDEN, 4 * HIDDEN), "down_proj": (4 * HIDDEN, HIDDEN)}),
}
GPT2_NAMES = {"qkv_proj": "attn.c_attn", "o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


def build(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs, _ = ARCHS[model_type]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(kwargs | overrides)))


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_every_projection_found_with_shapes(model_type):
    model = build(model_type)
    _, expected = ARCHS[model_type]
    cands = find_candidates(model)
    modules = dict(model.named_modules())
    assert len(cands) == LAYERS * len(expected)
    assert num_layers(cands) == LAYERS
    assert set(types_present(cands)) == set(expected)
    for c in cands:
        assert c.type in TYPES
        assert (c.d_in, c.d_out) == expected[c.type], c
        mod = modules[c.name]  # the real, fully-qualified name
        # d_in / d_out agree with what the module actually computes
        y = mod(torch.zeros(1, c.d_in, dtype=mod.weight.dtype))
        assert y.shape[-1] == c.d_out
        assert f".{c.layer}." in c.name
    # ordered by layer, one of each type per layer
    assert [c.layer for c in cands] == sorted(c.layer for c in cands)
    for layer in range(LAYERS):
        assert sorted(c.type for c in cands if c.layer == layer) == sorted(expected)


def test_gpt2_conv1d_names_and_flag():
    cands = find_candidates(build("gpt2"))
    assert all(c.conv1d for c in cands)
    for c in cands:
        assert c.name == f"transformer.h.{c.layer}.{GPT2_NAMES[c.type]}"


def test_llama_names_are_the_papers_seven_types():
    cands = find_candidates(build("llama"))
    assert [c.type for c in cands if c.layer == 0] == list(PAPER_TYPES)
    assert cands[6].name == "model.layers.0.mlp.down_proj"
    assert not any(c.conv1d for c in cands)


def test_types_filter_and_unknown_type():
    model = build("llama")
    downs = find_candidates(model, types=["down_proj"])
    assert [c.name for c in downs] == [f"model.layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    with pytest.raises(ModelError, match="unknown module types"):
        find_candidates(model, types=["mlp"])


def test_peft_wrapper_reports_base_names():
    from peft import LoraConfig, get_peft_model

    model = build("llama")
    before = [c.name for c in find_candidates(model)]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["model.layers.0.mlp.down_proj"]))
    assert [c.name for c in find_candidates(peft_model)] == before


class Unrecognisable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        self.head = torch.nn.Linear(4, 2)


def test_nothing_recognisable_lists_what_was_found():
    with pytest.raises(ModelError) as info:
        find_candidates(Unrecognisable())
    msg = str(info.value)
    for name in ("encoder.0", "encoder.2", "head"):
        assert name in msg
    assert "Unrecognisable" in msg and "Fix" in msg


def test_no_linear_layers_at_all():
    with pytest.raises(ModelError, match="linear layers found: none"):
        find_candidates(torch.nn.Sequential(torch.nn.ReLU()))

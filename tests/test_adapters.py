"""Adapters: attachment verified per variant, parameter counts, save/load round trips, bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama
from domlora.adapters.variants import (VARIANTS, adapted_modules, apply_adapter, attach, count_params, count_placement,
                              load_for_eval, save_adapter, to_peft_config)
from domlora.errors import ConfigError, ModelError

PLACED = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"]
# tiny Llama: hidden 16, intermediate 24, 4 heads / 2 kv heads -> v_proj 16 -> 8, down_proj 24 -> 16
SHAPES = {"model.layers.1.mlp.down_proj": (24, 16), "model.layers.2.self_attn.v_proj": (16, 8)}
# SPEC section 7: r = 64 counts on the paper's backbones
QWEN_DOWN6_R64 = 64 * (12288 + 4096)        # 1,048,576
QWEN_ALL_R64 = 174_587_904                  # "174.6M"
LLAMA_ALL_R64 = 167_772_160                 # "167.8M"



def _kw(variant):
    return {"total_step": 10} if variant == "adalora" else {}


@pytest.fixture
def base_dir(tiny_checkpoint):
    return tiny_checkpoint


def _randomise(model):
    """Give every trainable tensor non-zero values so a saved adapter changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


class TestAttach:
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_wrapped_set_equals_placement(self, tiny_model, variant):
        m = attach(tiny_model, PLACED, variant=variant, rank=4, alpha=8, **_kw(variant))
        assert sorted(adapted_modules(m)) == sorted(PLACED)
        trainable = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trainable
        for n in trainable:  # only adapter tensors, or the placed weights for `full`
            assert any(f".{x}." in n or n.startswith(x) for x in PLACED)

    def test_lora_count_is_r_times_din_plus_dout(self, tiny_model):
        m = attach(tiny_model, PLACED, variant="lora", rank=4, alpha=8)
        c = count_params(m)
        assert c["trainable_params"] == sum(4 * (a + b) for a, b in SHAPES.values())
        assert c["modules"] == 2

    def test_full_counts_the_placed_weights(self, tiny_model):
        m = attach(tiny_model, PLACED, variant="full", rank=4, alpha=8)
        assert count_params(m)["trainable_params"] == sum(a * b for a, b in SHAPES.values())

    def test_unknown_module_names_closest(self, tiny_model):
        with pytest.raises(ModelError, match="does not have.*closest.*layers.1.mlp.down_proj"):
            attach(tiny_model, ["model.layers.1.mlp.down_prj"], variant="lora", rank=4, alpha=8)

    def test_layer_out_of_range(self, tiny_model):
        with pytest.raises(ModelError, match="does not have"):
            attach(tiny_model, ["model.layers.9.mlp.down_proj"], variant="lora", rank=4, alpha=8)

    def test_not_a_projection(self, tiny_model):
        with pytest.raises(ModelError, match="not a linear projection"):
            attach(tiny_model, ["model.layers.1.mlp"], variant="lora", rank=4, alpha=8)

    def test_gralora_rank_not_divisible_explained_before_peft(self, tiny_model):
        with pytest.raises(ConfigError, match="divisible by k"):
            attach(tiny_model, PLACED, variant="gralora", rank=6, alpha=8, gralora_k=4)

    def test_gralora_features_not_divisible(self, tiny_model):
        # v_proj is 16 -> 8 and down_proj 24 -> 16: k=3 divides neither 16 nor 8
        with pytest.raises(ConfigError, match="in/out features divisible"):
            attach(tiny_model, PLACED, variant="gralora", rank=6, alpha=8, gralora_k=3)

    def test_adalora_needs_total_step(self, tiny_model):
        with pytest.raises(ConfigError, match="total"):
            attach(tiny_model, PLACED, variant="adalora", rank=4, alpha=8)

    def test_unknown_variant(self, tiny_model):
        with pytest.raises(ConfigError, match="unknown variant.*lora"):
            attach(tiny_model, PLACED, variant="qlora", rank=4, alpha=8)

    def test_empty_and_duplicate_placement(self, tiny_model):
        with pytest.raises(ConfigError, match="empty"):
            attach(tiny_model, [], variant="lora", rank=4, alpha=8)
        with pytest.raises(ConfigError, match="twice"):
            attach(tiny_model, PLACED + PLACED[:1], variant="lora", rank=4, alpha=8)

    def test_no_input_grad_hook_even_with_checkpointing(self, tiny_model):
        tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        m = attach(tiny_model, PLACED, variant="lora", rank=4, alpha=8)
        assert not any(getattr(mod, "_require_grads_hooks", None) for mod in m.modules())
        emb = m.get_base_model().get_input_embeddings()
        assert not emb(torch.tensor([[1, 2]])).requires_grad

    def test_peft_config_variants(self):
        assert to_peft_config(PLACED, variant="full", rank=4, alpha=8) is None
        assert to_peft_config(PLACED, variant="dora", rank=4, alpha=8).use_dora
        assert to_peft_config(PLACED, variant="rslora", rank=4, alpha=8).use_rslora
        ada = to_peft_config(PLACED, variant="adalora", rank=12, alpha=8, total_step=100)
        assert (ada.init_r, ada.target_r, ada.total_step) == (12, 8, 100)
        assert to_peft_config(PLACED, variant="gralora", rank=64, alpha=8).gralora_k == 4


class TestParamCounts:
    def test_qwen3_down_proj_layer6(self):
        c = count_placement("Qwen3-8B", strategy="explicit", layers=[6], types=["down_proj"], rank=64)
        assert c == {"trainable_params": QWEN_DOWN6_R64, "total_params": c["total_params"], "modules": 1}
        assert 8.1e9 < c["total_params"] < 8.3e9

    def test_all_modules_both_backbones(self):
        assert count_placement("Qwen3-8B", strategy="all", rank=64)["trainable_params"] == QWEN_ALL_R64
        c = count_placement("Llama-3.1-8B-Instruct", strategy="all", rank=64)
        assert c["trainable_params"] == LLAMA_ALL_R64 and c["modules"] == 7 * 32

    def test_cli_prints_one_json_line(self, capsys):
        from domlora.cli import main

        rc = main(["params", "--config", "Qwen3-8B", "--strategy", "explicit", "--layers", "6", "--types",
                   "down_proj", "--rank", "64"])
        out = capsys.readouterr().out.strip().splitlines()
        assert rc == 0 and len(out) == 1
        assert json.loads(out[0])["trainable_params"] == QWEN_DOWN6_R64

    def test_bad_config_name(self, capsys):
        from domlora.cli import main

        assert main(["params", "--config", "Qwen9", "--strategy", "all"]) == 2
        assert "Qwen3-8B" in capsys.readouterr().err


class TestSaveLoad:
    @pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "norm"])
    def test_round_trip_same_logits(self, base_dir, tmp_path, variant):
        from domlora.models import load_model

        loaded = load_model(str(base_dir), device="cpu")
        m = attach(loaded.model, PLACED, variant=variant, rank=4, alpha=8, **_kw(variant))
        _randomise(m)
        ids = torch.tensor([[3, 5, 7, 11, 13]])
        with torch.no_grad():
            want = m(input_ids=ids).logits
        save_adapter(m, tmp_path / "adapter", variant=variant, meta={"base_model": str(base_dir)})
        got = load_for_eval(str(base_dir), tmp_path / "adapter", device="cpu")
        with torch.no_grad():
            have = got.model(input_ids=ids).logits
            base = load_model(str(base_dir), device="cpu").model(input_ids=ids).logits
        assert torch.allclose(have, want, atol=1e-5)
        assert not torch.allclose(have, base, atol=1e-3)  # the adapter really is applied
        assert not any(p.requires_grad for p in got.model.parameters())

    def test_full_with_tied_embeddings(self, tiny_tokenizer, tmp_path):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(tmp_path / "base")
        tiny_tokenizer.save_pretrained(tmp_path / "base")
        m = attach(model, ["model.layers.0.mlp.down_proj"], variant="full", rank=4, alpha=8)
        m.requires_grad_(True)  # everything, as full fine-tuning does
        with torch.no_grad():
            m.lm_head.weight.add_(1.0)
        doc = save_adapter(m, tmp_path / "a", variant="full")
        assert doc["tied"] == {"model.embed_tokens.weight": "lm_head.weight"} or \
            doc["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
        got = load_for_eval(str(tmp_path / "base"), tmp_path / "a", device="cpu").model
        assert torch.equal(got.lm_head.weight, m.lm_head.weight)
        assert torch.equal(got.model.embed_tokens.weight, m.lm_head.weight)

    def test_peft_loads_plain_folder(self, base_dir, tmp_path):
        from peft import PeftModel

        from domlora.models import load_model

        m = attach(load_model(str(base_dir), device="cpu").model, PLACED, variant="dora", rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant="dora")
        pm = PeftModel.from_pretrained(load_model(str(base_dir), device="cpu").model, str(tmp_path / "a"))
        assert sorted(adapted_modules(pm)) == sorted(PLACED)

    def test_merge_matches_unmerged(self, base_dir, tmp_path):
        from domlora.models import load_model

        m = attach(load_model(str(base_dir), device="cpu").model, PLACED, variant="lora", rank=4, alpha=8)
        _randomise(m)
        save_adapter(m, tmp_path / "a", variant="lora")
        ids = torch.tensor([[2, 4, 6]])
        a = load_for_eval(str(base_dir), tmp_path / "a", device="cpu").model(input_ids=ids).logits
        b = load_for_eval(str(base_dir), tmp_path / "a", device="cpu", merge=True).model
        assert not hasattr(b, "peft_config")
        assert torch.allclose(a, b(input_ids=ids).logits, atol=1e-5)

    def test_save_is_atomic_on_failure(self, tiny_model, tmp_path, monkeypatch):
        m = attach(tiny_model, PLACED, variant="lora", rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant="lora")
        before = sorted(p.name for p in (tmp_path / "a").iterdir())

        def boom(*a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(type(m), "save_pretrained", boom)
        with pytest.raises(OSError):
            save_adapter(m, tmp_path / "a", variant="lora")
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
        assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder left behind


class TestLoadErrors:
    def test_missing_dir(self, base_dir, tmp_path):
        with pytest.raises(ModelError, match="does not exist"):
            load_for_eval(str(base_dir), tmp_path / "nope")

    def test_not_an_adapter_dir(self, base_dir, tmp_path):
        (tmp_path / "x").mkdir()
        with pytest.raises(ModelError, match="not an adapter folder"):
            load_for_eval(str(base_dir), tmp_path / "x")

    def test_truncated_weights(self, base_dir, tmp_path, tiny_model):
        m = attach(tiny_model, PLACED, variant="lora", rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant="lora")
        w = tmp_path / "a" / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:40])
        with pytest.raises(ModelError, match="corrupt or truncated"):
            load_for_eval(str(base_dir), tmp_path / "a")

    def test_missing_weights_file(self, base_dir, tmp_path, tiny_model):
        m = attach(tiny_model, PLACED, variant="lora", rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant="lora")
        (tmp_path / "a" / "adapter_model.safetensors").unlink()
        with pytest.raises(ModelError, match="incomplete"):
            load_for_eval(str(base_dir), tmp_path / "a")

    @pytest.mark.parametrize("variant", ["lora", "full"])
    def test_other_base_model_shape_mismatch(self, base_dir, tmp_path, tiny_tokenizer, variant):
        other = make_tiny_llama(len(tiny_tokenizer), hidden=32, inter=48)
        m = attach(other, PLACED, variant=variant, rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant=variant, meta={"base_model": "other-tiny"})
        with pytest.raises(ModelError, match="another base model.*other-tiny"):
            load_for_eval(str(base_dir), tmp_path / "a")

    def test_other_base_model_missing_module(self, tiny_tokenizer, tmp_path):
        deep = make_tiny_llama(len(tiny_tokenizer), layers=4)
        m = attach(deep, ["model.layers.3.mlp.down_proj"], variant="lora", rank=4, alpha=8)
        save_adapter(m, tmp_path / "a", variant="lora")
        with pytest.raises(ModelError, match="another base model"):
            apply_adapter(make_tiny_llama(len(tiny_tokenizer), layers=2), tmp_path / "a")

"""The probe pass's memory model and the batch size it picks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domlora.errors import ConfigError
from domlora.probes import budget
from domlora.samples import Encoded, collate, model_losses

ROOT = Path(__file__).resolve().parents[1]


def samples(lengths, target_from=0.5):
    return [Encoded(input_ids=list(range(1, T + 1)), loss_mask=[0] * int(T * target_from) + [1] * (T - int(T * target_from)))
            for T in lengths]


def llama(hidden=64, inter=160, layers=2, heads=4, kv_heads=2, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


class TestShapes:
    def test_qwen3_8b(self):
        from transformers import AutoConfig

        raw = json.loads((ROOT / "configs" / "Qwen3-8B.json").read_text())
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        assert budget.shapes_of(cfg) == budget.Shapes(hidden=4096, ffn=12288, kv=1024, attn=4096, layers=36,
                                                      vocab=151936)

    def test_gpt2(self):
        from transformers import GPT2Config

        s = budget.shapes_of(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100))
        assert (s.hidden, s.ffn, s.kv, s.attn, s.layers, s.vocab) == (64, 256, 64, 64, 3, 100)

    def test_unreadable_config(self):
        class Odd:
            pass

        with pytest.raises(ConfigError, match="fix: pass --batch-size N"):
            budget.shapes_of(Odd())


def test_saved_bytes_match_what_autograd_keeps():
    """The per-token count of `saved_per_token` against the tensors autograd saves for an activation-only
    backward of a Llama (weights frozen, embeddings requiring grad), one target so the logits are negligible."""
    model = llama()
    T, B = 96, 2
    batch = collate(samples([T] * B, target_from=(T - 1) / T), pad_id=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    h = model.get_input_embeddings().register_forward_hook(lambda _m, _i, o: o.requires_grad_(True))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_losses(model, batch)
    h.remove()
    mm = budget.memory_model(model.config, dtype=torch.float32)
    logits = B * 1 * 128 * 4 * 3
    assert sum(seen.values()) == pytest.approx(B * T * mm.saved_per_token + logits, rel=0.1)


class TestMemoryModel:
    def test_grows_with_batch_and_targets(self):
        mm = budget.memory_model(llama().config, dtype=torch.float32)
        enc = samples([40] * 8)
        sizes = [budget.worst_batch_bytes(mm, enc, bs) for bs in range(1, 9)]
        assert sizes == sorted(sizes) and sizes[0] > 0
        assert mm.batch_bytes(samples([40], 0.1)) > mm.batch_bytes(samples([40], 0.9))  # more targets, more logits

    def test_dtype_and_forward_only(self):
        cfg = llama().config
        f32 = budget.memory_model(cfg, dtype=torch.float32)
        bf16 = budget.memory_model(cfg, dtype=torch.bfloat16)
        fwd = budget.memory_model(cfg, dtype=torch.float32, page=False)
        assert bf16.per_token == pytest.approx(f32.per_token / 2)
        assert fwd.per_token == pytest.approx(f32.per_token / cfg.num_hidden_layers)
        assert fwd.kept_inputs(64) == 0 < f32.kept_inputs(64)

    def test_kept_inputs_follow_the_ghost_or_direct_choice(self):
        from domlora.probes.page import _cheaper

        mm = budget.memory_model(llama(hidden=64, inter=160).config, dtype=torch.float32)
        T = 512  # long: every group of this narrow model is cheaper direct, so X itself is kept
        assert _cheaper(T, 64, 64 + 2 * 32) == "direct"
        assert mm.kept_inputs(T) == pytest.approx(4 * 2 * T * (64 + 64 + 64 + 160))


class TestPlan:
    mm = budget.memory_model(llama().config, dtype=torch.float32)
    enc = samples([30, 50, 70, 90, 110, 130])

    def test_auto_is_the_largest_that_fits(self):
        room = budget.worst_batch_bytes(self.mm, self.enc, 3) * 1.01
        plan = budget.plan_batch_size(self.mm, self.enc, available=2 * room, memory_fraction=0.5)
        fits = [bs for bs in range(1, 7) if budget.worst_batch_bytes(self.mm, self.enc, bs) <= room]
        # sorted batches of 4 (30-90, then 110-130) happen to need less than batches of 3 (90-130 at once)
        assert fits == [1, 2, 3, 4]
        assert plan.auto and plan.batch_size == plan.largest_fitting == 4
        assert plan.worst_batch_bytes <= plan.budget_bytes
        assert plan.to_dict()["batch_size"] == 4

    def test_reserved_bytes_come_off_first(self):
        room = budget.worst_batch_bytes(self.mm, self.enc, 6)
        assert budget.plan_batch_size(self.mm, self.enc, available=room, memory_fraction=1.0).batch_size == 6
        plan = budget.plan_batch_size(self.mm, self.enc, available=room, memory_fraction=1.0, reserved=room / 2)
        assert plan.batch_size < 6

    def test_given_batch_size_that_does_not_fit(self):
        room = budget.worst_batch_bytes(self.mm, self.enc, 2) * 1.01
        ok = budget.plan_batch_size(self.mm, self.enc, batch_size=2, available=room, memory_fraction=1.0)
        assert not ok.auto and ok.batch_size == 2
        with pytest.raises(ConfigError, match="the largest batch size that fits is 2; fix: pass --batch-size 2"):
            budget.plan_batch_size(self.mm, self.enc, batch_size=4, available=room, memory_fraction=1.0)

    def test_nothing_fits(self):
        with pytest.raises(ConfigError, match="one sample of 130 tokens needs about .* fix: lower --max-length"):
            budget.plan_batch_size(self.mm, self.enc, available=1000.0)

    @pytest.mark.parametrize("kw,needle", [({"memory_fraction": 0}, "memory fraction"),
                                           ({"memory_fraction": 2}, "memory fraction"),
                                           ({"batch_size": 0}, "--batch-size must be >= 1 or auto"),
                                           ({"batch_size": "big"}, "--batch-size must be >= 1 or auto")])
    def test_bad_arguments(self, kw, needle):
        with pytest.raises(ConfigError, match=needle):
            budget.plan_batch_size(self.mm, self.enc, available=1e12, **kw)


@pytest.mark.parametrize("value", [0, -3, "big", True, 2.0, None])
def test_check_batch_size_refuses_what_is_not_auto_or_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1 or auto, got"):
        budget.check_batch_size(value, name="batch_size")


def test_check_batch_size_passes_auto_and_integers():
    assert budget.check_batch_size("auto") == "auto" and budget.check_batch_size(3) == 3


def test_available_memory_is_positive():
    assert budget.available_memory("cpu") > 0


def test_weight_bytes_counts_parameters_without_allocating():
    model = llama()
    n = sum(p.numel() for p in model.parameters())
    assert budget.weight_bytes(model.config, dtype=torch.bfloat16) == 2 * n


def test_token_cap_keeps_auto_batches_small():
    mm = budget.memory_model(llama().config, dtype=torch.float32)
    enc = samples([100] * 12)
    free = budget.plan_batch_size(mm, enc, available=1e12)
    capped = budget.plan_batch_size(mm, enc, available=1e12, max_batch_tokens=450)
    assert free.batch_size == 12 and capped.batch_size == 4 and capped.largest_fitting == 12
    assert budget.worst_batch_tokens(enc, 4) == 400 and capped.to_dict()["max_batch_tokens"] == 450
    # a given batch size is only checked against memory, and one long sample always gets a batch
    assert budget.plan_batch_size(mm, enc, batch_size=12, available=1e12, max_batch_tokens=450).batch_size == 12
    assert budget.plan_batch_size(mm, samples([900]), available=1e12, max_batch_tokens=450).batch_size == 1

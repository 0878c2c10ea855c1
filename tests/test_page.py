"""PAGE probe: exact per-sample gradient norms without weight gradients, and the closed form in alpha, r."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import chat_samples, make_tiny_llama
from domlora.errors import ConfigError
from domlora.modules import find_candidates
from domlora.probes.page import page_closed_form, page_probe, per_sample_sq_norms
from domlora.samples import collate, encode_samples, per_sample_loss
from domlora.probes.summary import page_summary

REL_TOL = 1e-6  # the task's bound for PAGE vs a per-sample .grad loop in float64


def naive_sq_norms(model, encoded, cands) -> torch.Tensor:
    """Reference: one sample at a time, unpadded, weights requiring grad, read `.grad`."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    weights = [modules[c.name].weight for c in cands]
    out = torch.zeros(len(encoded), len(cands), dtype=torch.float64)
    for i, e in enumerate(encoded):
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        batch = collate([e], pad_id=0)
        loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch)
        loss.sum().backward()
        out[i] = torch.tensor([float(w.grad.double().pow(2).sum()) for w in weights], dtype=torch.float64)
    return out


def max_rel_err(result, ref) -> torch.Tensor:
    got = torch.tensor(result.per_sample, dtype=torch.float64)
    return ((got - ref).abs() / ref.abs().clamp_min(1e-300)).max(0).values  # per module


@pytest.fixture
def probe_set(tiny_tokenizer):
    encoded, _ = encode_samples(tiny_tokenizer, chat_samples(6), max_length=500)
    assert len({len(e.input_ids) for e in encoded}) > 1  # batches will hold padding
    return encoded


@pytest.fixture
def model64(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)


class TestAgainstNaiveLoop:
    @pytest.mark.parametrize("method", ["direct", "ghost", "auto"])
    def test_every_module_matches(self, model64, probe_set, method):
        cands = find_candidates(model64)
        ref = naive_sq_norms(model64, probe_set, cands)
        assert (ref > 0).all()
        for batch_size in (1, 4, len(probe_set)):
            result = page_probe(model64, probe_set, batch_size=batch_size, method=method)
            err = max_rel_err(result, ref)
            assert err.max() < REL_TOL, {c.name: float(e) for c, e in zip(cands, err) if e >= REL_TOL}
            S = ref.mean(0)
            for j, c in enumerate(cands):
                assert math.isclose(result.S[c.name], float(S[j]), rel_tol=REL_TOL)
            if method != "auto":
                assert set(result.methods.values()) == {method}

    @pytest.mark.parametrize("model_type", ["gpt2", "phi3", "qwen3"])
    def test_other_architectures(self, model_type, tiny_tokenizer, probe_set):
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {"gpt2": dict(n_embd=16, n_layer=2, n_head=4, n_positions=512),
                  "phi3": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, pad_token_id=0, max_position_embeddings=512),
                  "qwen3": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=512)}[model_type]
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer), **kwargs)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval().requires_grad_(False)
        cands = find_candidates(model)
        ref = naive_sq_norms(model, probe_set, cands)
        result = page_probe(model, probe_set, batch_size=3, method="auto")
        assert max_rel_err(result, ref).max() < REL_TOL

    def test_batch_size_does_not_change_the_result(self, tiny_tokenizer):
        # float32 as shipped: batching changes only rounding
        model = make_tiny_llama(len(tiny_tokenizer))
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(7), max_length=500)
        runs = [torch.tensor(page_probe(model, encoded, batch_size=b).per_sample, dtype=torch.float64)
                for b in (1, 2, 3, 7)]
        for other in runs[1:]:
            assert torch.allclose(other, runs[0], rtol=1e-4, atol=0)

    def test_padding_contributes_zero(self, model64, tiny_tokenizer):
        # one short sample next to a long one: the padded batch gives the short one's unpadded value
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(4), max_length=500)
        lengths = [len(e.input_ids) for e in encoded]
        pair = [encoded[lengths.index(min(lengths))], encoded[lengths.index(max(lengths))]]
        assert len(pair[0].input_ids) < len(pair[1].input_ids)
        padded = torch.tensor(page_probe(model64, pair, batch_size=2).per_sample, dtype=torch.float64)
        alone = torch.tensor(page_probe(model64, pair[:1], batch_size=1).per_sample, dtype=torch.float64)
        assert torch.allclose(padded[0], alone[0], rtol=1e-10, atol=0)

    def test_samples_keep_their_order(self, model64, probe_set):
        # iter_batches sorts by length; per_sample rows must still follow the probe set
        ref = naive_sq_norms(model64, probe_set, find_candidates(model64))
        got = torch.tensor(page_probe(model64, probe_set, batch_size=2).per_sample, dtype=torch.float64)
        assert torch.allclose(got, ref, rtol=REL_TOL, atol=0)


class TestNoWeightGradients:
    def test_frozen_model_gets_no_grad(self, model64, probe_set):
        page_probe(model64, probe_set, batch_size=3)
        assert all(p.grad is None for p in model64.parameters())
        assert not any(p.requires_grad for p in model64.parameters())

    def test_trainable_model_is_frozen_during_probe_and_restored(self, model64, probe_set):
        # a user's model straight from from_pretrained has requires_grad=True everywhere
        model64.requires_grad_(True)
        model64.lm_head.requires_grad_(False)
        before = {n: p.requires_grad for n, p in model64.named_parameters()}
        ref = naive_sq_norms(model64, probe_set[:2], find_candidates(model64))
        result = page_probe(model64, probe_set[:2], batch_size=2)
        assert all(p.grad is None for p in model64.parameters())
        assert {n: p.requires_grad for n, p in model64.named_parameters()} == before
        assert max_rel_err(result, ref).max() < REL_TOL

    def test_no_weight_gradient_is_ever_formed(self, model64, probe_set, monkeypatch):
        # every parameter is frozen while the probe runs, so autograd has nothing to accumulate into
        seen = []
        real_backward = torch.Tensor.backward

        def spy(self, *a, **k):
            seen.append([n for n, p in model64.named_parameters() if p.requires_grad])
            return real_backward(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, "backward", spy)
        model64.requires_grad_(True)
        page_probe(model64, probe_set, batch_size=3)
        assert seen and all(s == [] for s in seen)

    def test_model_mode_restored(self, model64, probe_set):
        model64.train()
        page_probe(model64, probe_set[:1])
        assert model64.training


class TestClosedForm:
    def test_formula(self):
        assert page_closed_form(3.0, alpha=16, rank=8, d_in=576) == pytest.approx(16**2 * 3.0 / (3 * 8 * 576))

    def test_with_lora_rescales(self, model64, probe_set):
        result = page_probe(model64, probe_set[:2], alpha=16, rank=8)
        other = result.with_lora(alpha=128, rank=64)
        for c in result.candidates:
            assert other.page[c.name] == pytest.approx(result.page[c.name] * (128**2 / 64) / (16**2 / 8))
            assert result.page[c.name] == pytest.approx(16**2 * result.S[c.name] / (3 * 8 * c.d_in))

    def test_monte_carlo_over_peft_lora_init(self, model64, probe_set):
        """E_A mean_i ||dL_i/dB||^2 over PEFT's own lora_A init (B = 0), by real autograd, vs PAGE."""
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        # a larger rank gives more independent rows of A per backward: E[A^T A] = r/(3 d_in) I either way
        alpha, rank, draws = 16.0, 32, 60
        samples = probe_set[:3]
        # modules with different d_in (16 and 24) so a wrong d_in in the formula shows
        targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj"]
        cands = [c for c in find_candidates(model64) if c.name in targets]
        page = page_probe(model64, samples, alpha=alpha, rank=rank, candidates=cands, batch_size=3).page

        peft_model = get_peft_model(copy.deepcopy(model64), LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=True))
        layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                  if isinstance(m, LoraLayer)}
        assert set(layers) == set(targets)
        batches = [collate([e], pad_id=0) for e in samples]
        per_draw = torch.zeros(draws, len(targets), dtype=torch.float64)
        torch.manual_seed(1)
        for d in range(draws):
            for layer in layers.values():
                layer.reset_lora_parameters("default", True)  # PEFT's own: kaiming-uniform A, zero B
                assert layer.lora_B["default"].weight.abs().sum() == 0
            for b in batches:
                peft_model.zero_grad(set_to_none=True)
                loss = per_sample_loss(peft_model(input_ids=b["input_ids"]).logits, b)
                loss.sum().backward()
                for j, name in enumerate(targets):
                    per_draw[d, j] += layers[name].lora_B["default"].weight.grad.pow(2).sum() / len(batches)
        mc = per_draw.mean(0)
        se = per_draw.std(0) / math.sqrt(draws)
        for j, name in enumerate(targets):
            assert se[j] < 0.05 * mc[j]  # precise enough to tell d_in = 16 from 24, or a missing factor 3
            assert abs(mc[j] - page[name]) < 4 * se[j], (name, float(mc[j]), page[name], float(se[j]))


class TestSqNorms:
    @pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 9, 4, 3), (1, 1, 6, 6)])
    def test_direct_equals_ghost_equals_definition(self, shape):
        B, T, d_in, d_out = shape
        X = torch.randn(B, T, d_in, dtype=torch.float64)
        D = torch.randn(B, T, d_out, dtype=torch.float64)
        X[0, T // 2:] = 0  # padded rows
        ref = torch.stack([(D[i].T @ X[i]).pow(2).sum() for i in range(B)])
        for method in ("direct", "ghost", "auto"):
            assert torch.allclose(per_sample_sq_norms(X, D, method=method), ref, rtol=1e-12)

    @pytest.mark.parametrize("T", [5, 64, 130, 257, 300])
    def test_block_triangular_ghost_with_mask(self, T):
        from domlora.probes.page import _reduce_input, _sq_norms_from

        B, d_in, d_out = 3, 20, 12
        X = torch.randn(B, T, d_in, dtype=torch.float64)
        D = torch.randn(B, T, d_out, dtype=torch.float64)
        keep = torch.ones(B, T, 1, dtype=torch.long)
        keep[1, T // 3:] = 0  # padding
        keep[2, 0] = 0  # an excluded first position
        ref = torch.stack([(D[i].T @ (X[i] * keep[i])).pow(2).sum() for i in range(B)])
        for method in ("ghost", "direct"):
            entry = _reduce_input(X, keep, method=method, d_in=d_in, d_out_group=d_out)
            assert entry["method"] == method
            assert torch.allclose(_sq_norms_from(entry, D), ref, rtol=1e-12)
        if T >= 128:
            assert len(_reduce_input(X, keep, method="ghost", d_in=d_in, d_out_group=d_out)["blocks"]) > 1

    def test_half_inputs_accumulate_in_float32(self):
        X = torch.randn(2, 4, 8).to(torch.bfloat16)
        D = torch.randn(2, 4, 8).to(torch.bfloat16)
        assert per_sample_sq_norms(X, D).dtype == torch.float32


class TestErrors:
    @pytest.mark.parametrize("alpha,rank", [(0, 8), (-1, 8), (16, 0), (16, -2), (float("nan"), 8), (16, 2.5)])
    def test_bad_lora_shape(self, model64, probe_set, alpha, rank):
        with pytest.raises(ConfigError):
            page_probe(model64, probe_set, alpha=alpha, rank=rank)

    def test_empty_probe_set(self, model64):
        with pytest.raises(ConfigError, match="empty"):
            page_probe(model64, [])

    def test_unknown_method(self, model64, probe_set):
        with pytest.raises(ConfigError, match="method"):
            page_probe(model64, probe_set, method="fast")

    def test_candidate_not_in_model(self, model64, probe_set):
        from domlora.modules import Candidate

        with pytest.raises(ConfigError, match="not in this model"):
            page_probe(model64, probe_set, candidates=[Candidate("model.layers.9.mlp.down_proj", 9, "down_proj", 24, 16)])


class TestSummary:
    def test_page_json_document(self, model64, probe_set):
        result = page_probe(model64, probe_set, alpha=16, rank=8)
        doc = page_summary(result, model="tiny")
        mods = doc["modules"]
        assert set(mods) == {c.name for c in result.candidates}
        assert {k for k in doc} >= {"model", "alpha", "rank", "n_samples", "dominant", "argmax", "modules"}
        assert doc["n_samples"] == len(probe_set) and doc["alpha"] == 16 and doc["rank"] == 8
        for m in mods.values():
            assert set(m) == {"type", "layer", "d_in", "d_out", "S", "PAGE", "share_total", "share_type"}
            assert m["PAGE"] == pytest.approx(16**2 * m["S"] / (3 * 8 * m["d_in"]))
        assert sum(m["share_total"] for m in mods.values()) == pytest.approx(1.0)
        for t in {m["type"] for m in mods.values()}:
            assert sum(m["share_type"] for m in mods.values() if m["type"] == t) == pytest.approx(1.0)
        downs = {n: m["PAGE"] for n, m in mods.items() if m["type"] == "down_proj"}
        assert doc["dominant"] == max(downs, key=downs.get)
        assert doc["argmax"] == max(mods, key=lambda n: mods[n]["PAGE"])
        assert doc["argmax_differs"] == (doc["argmax"] != doc["dominant"])
        assert doc["dominant_share_total"] == mods[doc["dominant"]]["share_total"]


class TestInputGroups:
    def test_modules_reading_one_input_share_a_group(self, model64):
        from domlora.probes.runner import input_groups

        cands = find_candidates(model64)
        group, calls = input_groups(model64, dict(model64.named_modules()), cands, [1, 2, 3, 4], torch.device("cpu"))
        assert calls == [1] * len(cands)
        by_type = {}
        for c, g in zip(cands, group):
            by_type.setdefault(c.layer, {})[c.type] = g
        for layer in by_type.values():
            assert layer["q_proj"] == layer["k_proj"] == layer["v_proj"]
            assert layer["gate_proj"] == layer["up_proj"]
            assert len({layer["q_proj"], layer["o_proj"], layer["gate_proj"], layer["down_proj"]}) == 4
        assert len(set(group)) == 4 * len(by_type)

    def test_shared_module_called_twice_is_refused(self, tiny_tokenizer, probe_set):
        model = make_tiny_llama(len(tiny_tokenizer))
        model.model.layers[1].mlp = model.model.layers[0].mlp  # one module, two calls per forward
        with pytest.raises(ConfigError, match="more than once per forward pass"):
            page_probe(model, probe_set)

    def test_group_cost_rule(self):
        from domlora.probes.page import _cheaper

        # SmolLM2 shapes at T = 256: alone k_proj (576 -> 192) is cheaper direct, in its q/k/v group ghost
        assert _cheaper(256, 576, 192) == "direct"
        assert _cheaper(256, 576, 576 + 192 + 192) == "ghost"
        assert _cheaper(4096, 576, 1536) == "direct"

"""Activation diagnostics: find a planted massive activation and its super weight, forward-only, model untouched."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import chat_samples, make_massive_llama

from domlora.probes.activations import MassiveCriterion, activation_diagnostics
from domlora.probes.summary import plot_activations
from domlora.studies.diagnostics import diagnose
from domlora.errors import ConfigError, ModelError
from domlora.samples import encode_samples

# where make_massive_llama plants its super weight
AT, OUT_CH, IN_CH = 1, 5, 7


@pytest.fixture
def encoded(tiny_tokenizer):
    enc, _ = encode_samples(tiny_tokenizer, chat_samples(6), max_length=64)
    return enc


@pytest.fixture
def massive_model(tiny_tokenizer):
    return make_massive_llama(len(tiny_tokenizer), at=AT, out_channel=OUT_CH, in_channel=IN_CH)


def _fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


class TestPlantedMassiveActivation:
    def test_onset_channel_and_jump(self, massive_model, encoded):
        r = activation_diagnostics(massive_model, encoded, batch_size=4)
        assert r.onset_layer == AT
        before, at = r.layers[AT - 1], r.layers[AT]
        assert at.peak.channel == OUT_CH and at.channel_fraction == 1.0
        assert at.massive_fraction == 1.0 and before.massive_fraction == 0.0
        assert at.jump > 100 and at.peak_before < 1.0
        assert at.mlp_share == pytest.approx(1.0, abs=1e-3)  # the FFN, not attention, made the jump
        # the massive value is carried along the residual stream
        assert all(s.peak.channel == OUT_CH and s.massive_fraction == 1.0 for s in r.layers[AT:])

    def test_super_weight_candidate(self, massive_model, encoded):
        r = activation_diagnostics(massive_model, encoded)
        d = r.down_proj_at(AT)
        assert d.input_peak.channel == IN_CH
        sw = d.super_weight
        assert (sw.row, sw.col) == (OUT_CH, IN_CH)
        assert sw.aligned and sw.column_rank == 1
        assert sw.share == pytest.approx(1.0, abs=1e-2)
        assert sw.weight == pytest.approx(massive_model.model.layers[AT].mlp.down_proj.weight[OUT_CH, IN_CH].item())
        assert sw.column_outliers[0]["row"] == OUT_CH and sw.column_outliers[0]["ratio_to_median"] > 100

    def test_peak_location_is_real(self, massive_model, encoded):
        r = activation_diagnostics(massive_model, encoded)
        pk = r.layers[AT].peak
        # recompute the block output for the peak's sample and read the value back
        e = encoded[pk.sample]
        seen = {}
        h = massive_model.model.layers[AT].register_forward_hook(lambda _m, _i, o: seen.setdefault("h", o))
        with torch.no_grad():
            massive_model(input_ids=torch.tensor([e.input_ids]), use_cache=False)
        h.remove()
        out = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
        assert out[0, pk.position, pk.channel].item() == pytest.approx(pk.value, rel=1e-4)
        assert out[0].abs().max().item() == pytest.approx(pk.magnitude, rel=1e-4)

    def test_batch_size_does_not_matter(self, massive_model, encoded):
        a = activation_diagnostics(massive_model, encoded, batch_size=1).to_dict()
        b = activation_diagnostics(massive_model, encoded, batch_size=5).to_dict()
        for la, lb in zip(a["layers"], b["layers"]):
            assert la["max"] == pytest.approx(lb["max"], rel=1e-4)
            assert la["median"] == pytest.approx(lb["median"], rel=1e-4)
            assert la["peak"]["channel"] == lb["peak"]["channel"]
        assert a["onset_layer"] == b["onset_layer"]

    def test_no_phenomenon_in_a_plain_random_model(self, tiny_model, encoded):
        r = activation_diagnostics(tiny_model, encoded)
        assert r.onset_layer is None
        assert all(s.massive_fraction == 0 for s in r.layers)

    def test_criterion_decides(self, massive_model, encoded):
        strict = MassiveCriterion(abs_threshold=1e9)
        assert activation_diagnostics(massive_model, encoded, criterion=strict).onset_layer is None


class TestModelUntouched:
    def test_parameters_hooks_mode_and_grads(self, massive_model, encoded):
        massive_model.train()
        flags = [p.requires_grad for p in massive_model.parameters()]
        before, hooks = _fingerprint(massive_model), _hooks(massive_model)
        activation_diagnostics(massive_model, encoded)
        assert _fingerprint(massive_model) == before
        assert _hooks(massive_model) == hooks
        assert massive_model.training
        assert [p.requires_grad for p in massive_model.parameters()] == flags
        assert all(p.grad is None for p in massive_model.parameters())

    def test_hooks_removed_on_error(self, massive_model, encoded):
        hooks = _hooks(massive_model)
        bad = encoded[:1]
        bad[0].input_ids = [10**6]  # an id outside the vocabulary: the forward pass fails
        with pytest.raises((IndexError, RuntimeError)):
            activation_diagnostics(massive_model, bad)
        assert _hooks(massive_model) == hooks


class TestBadInput:
    def test_empty_probe_set(self, tiny_model):
        with pytest.raises(ConfigError, match="empty"):
            activation_diagnostics(tiny_model, [])

    def test_model_without_ffn(self, encoded):
        class Attn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj = torch.nn.Linear(8, 8)

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.self_attn = Attn()

        class AttnOnly(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([Block(), Block()])

        with pytest.raises(ModelError, match="no FFN down projection"):
            activation_diagnostics(AttnOnly(), encoded)

    def test_model_without_projections(self, encoded):
        with pytest.raises(ModelError, match="no adaptable projections"):
            activation_diagnostics(torch.nn.Sequential(torch.nn.Embedding(4, 4)), encoded)

    def test_bad_criterion(self):
        with pytest.raises(ConfigError):
            MassiveCriterion(ratio=0.5)
        with pytest.raises(ConfigError):
            MassiveCriterion(min_fraction=0)


def test_gpt2_conv1d(tiny_tokenizer):
    """GPT-2's Conv1D stores W transposed; the super weight must still be [out, in]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=3, n_head=2, n_positions=128))
    m.eval()
    with torch.no_grad():
        m.transformer.h[1].mlp.c_fc.weight[:, IN_CH] *= 80  # Conv1D: (d_in, d_out)
        m.transformer.h[1].mlp.c_proj.weight[IN_CH, OUT_CH] = 80.0
    enc, _ = encode_samples(tiny_tokenizer, chat_samples(4), max_length=48)
    r = activation_diagnostics(m, enc)
    d = r.down_proj_at(1)
    assert d.name == "transformer.h.1.mlp.c_proj"
    assert (d.super_weight.row, d.super_weight.col) == (OUT_CH, IN_CH)


def test_plot_and_json(massive_model, encoded, tmp_path):
    r = activation_diagnostics(massive_model, encoded).to_dict()
    json.dumps(r)  # serialisable
    page = {"dominant": f"model.layers.{AT}.mlp.down_proj",
            "modules": {f"model.layers.{i}.mlp.down_proj": {"type": "down_proj", "layer": i, "PAGE": 1.0 + i}
                        for i in range(4)}}
    for kw in ({}, {"page": page, "massive": {"layer": AT}}):
        out = plot_activations(r, tmp_path / f"a{len(kw)}.png", **kw)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_stage(massive_model, tiny_tokenizer, chat_jsonl, tmp_path):
    from domlora.cli import main

    folder = tmp_path / "model"
    massive_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", str(folder), "--data", str(chat_jsonl), "--out", str(out),
                 "--samples", "4", "--dtype", "float32", "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == {"activations.json", "massive.json", "activations.png"}
    doc = json.loads((out / "massive.json").read_text())
    assert doc["predicted"] == f"model.layers.{AT}.mlp.down_proj" and doc["phenomenon"]
    # an empty data file is refused before any model work
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["diagnose", "--model", str(folder), "--data", str(empty), "--out", str(out)]) == 2
    with pytest.raises(ConfigError):
        diagnose(model=str(folder), data=chat_jsonl, out_dir=out, probe_path=tmp_path / "missing.json")


# measured on the embedded SmolLM2-135M-Instruct (see docs/why.md): the massive activation appears after
# block 11 on the first token, in residual channel 507, written by down_proj weight [507, 1229]
EMBEDDED_ONSET, EMBEDDED_CHANNEL, EMBEDDED_SUPER_WEIGHT = 11, 507, (507, 1229)


@pytest.mark.slow
def test_embedded_model_and_cache_untouched(tmp_path):
    from domlora.models import embedded_checkpoint, load_model
    from domlora.probes.massive import massive_predict

    cache = embedded_checkpoint()
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.rglob("*")) if p.is_file()}
    lm = load_model("embedded", dtype="float32", device="cpu")
    before = _fingerprint(lm.model)
    enc, _ = encode_samples(lm.tokenizer, chat_samples(2), max_length=96)
    pred, report = massive_predict(lm.model, enc)
    assert _fingerprint(lm.model) == before
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.rglob("*")) if p.is_file()} == files
    assert report.onset_layer == EMBEDDED_ONSET and pred.module == f"model.layers.{EMBEDDED_ONSET}.mlp.down_proj"
    at = report.layers[EMBEDDED_ONSET]
    assert at.peak.channel == EMBEDDED_CHANNEL and at.first_token_fraction == 1.0 and at.jump > 50
    sw = report.down_proj_at(EMBEDDED_ONSET).super_weight
    assert (sw.row, sw.col) == EMBEDDED_SUPER_WEIGHT and sw.aligned


@pytest.mark.parametrize("n", [100, 8192, 147_456, 147_457])
def test_lower_median_is_torch_median(n):
    """The bracketed selection returns exactly torch.median's element, also for data built to defeat a
    strided subsample (a huge value every 576th entry, per-channel scales) and when the bracket misses."""
    from domlora.probes import activations

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.rand(576, generator=g).repeat(n // 576 + 1)[:n]).abs()
    x[::576] = 1e4
    assert activations.lower_median(x) == float(x.median())
    assert activations.lower_median(x.double()) == float(x.double().median())
    ties = torch.zeros(n)  # every value equal: the bracket holds them all
    assert activations.lower_median(ties) == 0.0


def test_lower_median_falls_back_when_the_bracket_misses(monkeypatch):
    import numpy as np

    from domlora.probes import activations

    x = torch.arange(20_000, dtype=torch.float32)
    # a subsample of the smallest values only: the bracket lies below the median
    monkeypatch.setitem(activations._SAMPLE_INDEX, 20_000, np.arange(1024))
    assert activations.lower_median(x) == float(x.median()) == 9999.0

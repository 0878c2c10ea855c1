"""One pass, every step-0 signal: equal to PAGE, NFN and the activation statistics computed on their own,
and independent of batching and of the order of the samples."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from conftest import chat_samples, make_massive_llama, make_tiny_llama
from domlora.errors import ConfigError
from domlora.probes.activations import activation_diagnostics
from domlora.probes.nfn import nfn_probe
from domlora.probes.page import page_probe
from domlora.probes.step0 import step0_probe
from domlora.samples import encode_samples

REL = 1e-6  # float64 model: the one-pass numbers may differ from the separate passes only by rounding


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def probe_set(tiny_tokenizer):
    encoded, _ = encode_samples(tiny_tokenizer, chat_samples(7), max_length=500)
    return encoded


def close(a, b, rel=REL) -> bool:
    """Nested dicts/lists equal, numbers to a relative tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=rel, abs=1e-300, nan_ok=True)
    return a == b


def report_dict(report) -> dict:
    d = report.to_dict()
    d.pop("seconds")
    return d


class TestEqualsSeparatePasses:
    @pytest.mark.parametrize("batch_size", [1, 3])
    def test_page_nfn_activations(self, tiny_tokenizer, probe_set, batch_size):
        model = make_massive_llama(len(tiny_tokenizer)).to(torch.float64)
        one = step0_probe(model, probe_set, alpha=32, rank=4, batch_size=batch_size, nfn_seed=5)
        page = page_probe(model, probe_set, alpha=32, rank=4, batch_size=1)
        nfn = nfn_probe(model, probe_set, batch_size=8, seed=5)
        acts = activation_diagnostics(model, probe_set, batch_size=8)

        assert [c.name for c in one.page.candidates] == [c.name for c in page.candidates]
        assert close(one.page.S, page.S) and close(one.page.per_sample, page.per_sample)
        assert one.page.methods == page.methods and one.page.n_samples == page.n_samples
        assert close(one.page.page, page.page)
        assert close(one.nfn.module_scores, nfn.module_scores) and one.nfn.n_tokens == nfn.n_tokens
        assert close(one.nfn.type_scores, nfn.type_scores)
        assert close(report_dict(one.activations), report_dict(acts))
        # the planted massive activation is there to be found, so the comparison is not of empty reports
        assert one.activations.onset_layer == 1

    def test_float32_model(self, tiny_tokenizer, probe_set):
        model = make_tiny_llama(len(tiny_tokenizer))
        one = step0_probe(model, probe_set, batch_size=4)
        assert close(one.page.S, page_probe(model, probe_set, batch_size=4).S, rel=1e-5)
        assert close(one.nfn.module_scores, nfn_probe(model, probe_set, batch_size=4).module_scores, rel=1e-5)
        assert close(report_dict(one.activations), report_dict(activation_diagnostics(model, probe_set,
                                                                                      batch_size=4)), rel=1e-5)

    def test_signals_can_be_skipped(self, tiny_model, probe_set, monkeypatch):
        only_page = step0_probe(tiny_model, probe_set, nfn=False, activations=False)
        assert only_page.nfn is None and only_page.activations is None and only_page.stats.backward

        def no_backward(*a, **k):
            raise AssertionError("forward-only signals must not run a backward pass")

        monkeypatch.setattr(torch.Tensor, "backward", no_backward)
        forward = step0_probe(tiny_model, probe_set, page=False)
        assert forward.page is None and forward.nfn is not None and forward.activations is not None
        assert not forward.stats.backward
        with pytest.raises(ConfigError, match="no signal asked for"):
            step0_probe(tiny_model, probe_set, page=False, nfn=False, activations=False)

    def test_model_left_as_it_was(self, tiny_model, probe_set):
        tiny_model.train()
        tiny_model.requires_grad_(True)
        before = copy.deepcopy(tiny_model.state_dict())
        step0_probe(tiny_model, probe_set, batch_size=2)
        assert tiny_model.training
        assert all(p.requires_grad and p.grad is None for p in tiny_model.parameters())
        assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
        for m in tiny_model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks


class TestOrderAndBatching:
    def test_scores_do_not_depend_on_sample_order(self, tiny_tokenizer, probe_set):
        model = make_massive_llama(len(tiny_tokenizer))
        shuffled = list(probe_set)
        random.Random(3).shuffle(shuffled)
        assert [e.input_ids for e in shuffled] != [e.input_ids for e in probe_set]
        a = step0_probe(model, probe_set, batch_size=3)
        b = step0_probe(model, shuffled, batch_size=3)
        # length-sorted batches with ties broken by the tokens: the same batches, the same rows
        assert close(a.page.S, b.page.S, rel=1e-12)
        assert a.nfn.module_scores == b.nfn.module_scores
        assert a.stats.n_padded == b.stats.n_padded
        for la, lb in zip(a.activations.layers, b.activations.layers):
            assert la.peak.magnitude == lb.peak.magnitude and la.median == lb.median
            assert la.massive_fraction == lb.massive_fraction and la.jump == lb.jump
        assert a.activations.onset_layer == b.activations.onset_layer

    def test_batches_are_length_sorted(self, tiny_model, probe_set):
        lengths = sorted(len(e.input_ids) for e in probe_set)
        stats = step0_probe(tiny_model, probe_set, batch_size=3, nfn=False, activations=False).stats
        # padded slots: each batch of 3 consecutive lengths padded to its longest
        want = sum(len(lengths[k:k + 3]) * max(lengths[k:k + 3]) for k in range(0, len(lengths), 3))
        assert stats.n_padded == want and stats.n_tokens == sum(lengths) and stats.n_batches == 3


def test_probe_stage_scores_do_not_depend_on_the_file_order(tiny_model_dir, tmp_path):
    """The probe stage on the same samples written in two orders: the same page.json / nfn.json scores."""
    from domlora.io import read_json
    from domlora.pipeline.stages.probe import probe

    rows = chat_samples(6)
    docs = {}
    for name, order in (("a", rows), ("b", list(reversed(rows)))):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in order))
        probe(model=str(tiny_model_dir), data=data, out_dir=tmp_path / name, samples=6, max_length=200,
              batch_size=2, dtype="float32", activations=False)
        docs[name] = (read_json(tmp_path / name / "page.json"), read_json(tmp_path / name / "nfn.json"))
    (pa, na), (pb, nb) = docs["a"], docs["b"]
    assert close({k: m["S"] for k, m in pa["modules"].items()}, {k: m["S"] for k, m in pb["modules"].items()},
                 rel=1e-12)
    assert pa["dominant"] == pb["dominant"] and pa["argmax"] == pb["argmax"]
    assert na["modules"] == nb["modules"] and na["type_scores"] == nb["type_scores"]


@pytest.mark.slow
def test_embedded_model_one_pass_equals_separate_passes(tmp_path):
    """On SmolLM2-135M (float32, 8 samples of the arith probe set): the one-pass numbers against
    `page_probe`, `nfn_probe` and `activation_diagnostics` run separately at their own batch sizes."""
    from domlora.data import prepare_dataset
    from domlora.models import load_model
    from domlora.samples import read_samples

    prepare_dataset("arith", tmp_path / "arith", n_train=0, n_probe=8, n_eval=0, seed=1234)
    lm = load_model("embedded", dtype="float32", device="cpu")
    encoded, _ = encode_samples(lm.tokenizer, read_samples(tmp_path / "arith" / "probe.jsonl"), max_length=256)
    model = lm.model
    torch.set_num_threads(2)
    one = step0_probe(model, encoded, batch_size=4)
    page = page_probe(model, encoded, batch_size=1)
    nfn = nfn_probe(model, encoded, batch_size=8)
    acts = activation_diagnostics(model, encoded, batch_size=8)

    def rel(a, b):
        return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)

    assert rel(one.page.S, page.S) < 1e-4
    assert rel(one.nfn.module_scores, nfn.module_scores) < 1e-4
    assert close(report_dict(one.activations), report_dict(acts), rel=1e-4)
    assert one.activations.onset_layer == acts.onset_layer == 11  # docs/why.md


def test_probe_stage_without_a_down_projection_skips_the_statistics(tmp_path, monkeypatch, caplog):
    """A model whose blocks have no recognisable FFN down projection still gets PAGE and NFN."""
    from domlora.errors import ModelError
    from domlora.io import read_json
    from domlora.pipeline.stages import probe as probe_stage
    from domlora.pipeline.stages.probe import probe

    def no_down(model):
        raise ModelError("no FFN down projection recognised in Toy (module types found: q_proj); fix: ...")

    monkeypatch.setattr(probe_stage, "ffn_down_candidates", no_down)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_samples(3)))
    from conftest import make_tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    doc = probe(model=str(ckpt), data=data, out_dir=tmp_path / "out", dtype="float32")
    assert doc["signals"] == ["page", "nfn"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nfn.json", "page.json", "page.png"]
    assert "no activation statistics" in caplog.text
    assert read_json(tmp_path / "out" / "page.json")["dominant"]

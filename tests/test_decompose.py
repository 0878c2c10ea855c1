"""PAGE decomposition: sink / rest split equals PAGE with positions excluded; effective rank equals SVD of G_i."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import chat_samples, make_massive_llama, make_tiny_llama

from domlora.studies.decompose import page_decompose
from domlora.probes.activations import MassiveCriterion
from domlora.errors import ConfigError
from domlora.probes.page import page_probe
from domlora.samples import collate, encode_samples, per_sample_loss

# hidden 16 takes the direct route (T > d); hidden 128 with <= 60 tokens the Gram route (T (d_in + d_out) < d_in d_out)
SHAPES = {"direct": dict(hidden=16, inter=24, max_length=64), "gram": dict(hidden=128, inter=256, max_length=60)}


@pytest.fixture(params=sorted(SHAPES))
def setup(request, tiny_tokenizer):
    s = SHAPES[request.param]
    model = make_tiny_llama(len(tiny_tokenizer), hidden=s["hidden"], inter=s["inter"])
    enc, _ = encode_samples(tiny_tokenizer, chat_samples(5), max_length=s["max_length"])
    return request.param, model, enc


def _col(rows, j):
    return sum(r[j] for r in rows) / len(rows)


def _per_sample_grads(model, enc, names):
    """G_i = dL_i/dW for each sample, the slow way (real weight gradients)."""
    mods = dict(model.named_modules())
    out = []
    for e in enc:
        for n in names:
            mods[n].weight.requires_grad_(True)
        b = collate([e], pad_id=0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        per_sample_loss(logits, b).sum().backward()
        out.append({n: mods[n].weight.grad.detach().double().clone() for n in names})
        for n in names:
            mods[n].weight.grad = None
            mods[n].weight.requires_grad_(False)
    return out


class TestSplit:
    def test_total_equals_page_and_rest_equals_excluded(self, setup):
        route, model, enc = setup
        full = page_probe(model, enc, batch_size=2)
        no_first = page_probe(model, enc, batch_size=3, exclude_positions=[0])
        only_first = page_probe(model, enc, batch_size=2,
                                exclude_positions=lambda idx, batch: torch.arange(batch["input_ids"].shape[1])[None, :]
                                .expand_as(batch["input_ids"]) > 0)
        d = page_decompose(model, enc, batch_size=3)
        assert route in set(d.methods.values())
        for j, c in enumerate(d.candidates):
            assert _col(d.total, j) == pytest.approx(full.S[c.name], rel=1e-4, abs=1e-12)
            assert _col(d.rest_part, j) == pytest.approx(no_first.S[c.name], rel=1e-4, abs=1e-12)
            assert _col(d.sink_part, j) == pytest.approx(only_first.S[c.name], rel=1e-4, abs=1e-12)
        for name, m in d.module_table().items():
            assert m["sink_share"] + m["rest_share"] + m["cross_share"] == pytest.approx(1.0, abs=1e-9)
            assert 0 <= m["input_energy_sink"] <= 1

    def test_page_result_parts(self, setup):
        _, model, enc = setup
        d = page_decompose(model, enc, batch_size=4, rank_types=())
        full = page_probe(model, enc, batch_size=4)
        pr = d.page_result("total")
        for c in pr.candidates:
            assert pr.page[c.name] == pytest.approx(full.page[c.name], rel=1e-4, abs=1e-12)
        assert d.page_result("rest").S != pr.S
        with pytest.raises(ConfigError):
            d.page_result("middle")
        # no effective rank was asked for
        assert all(math.isnan(v) for row in d.top_sv_share for v in row)


class TestEffectiveRank:
    def test_matches_svd_of_formed_gradients(self, setup):
        _, model, enc = setup
        enc = enc[:3]
        d = page_decompose(model, enc, batch_size=2)
        names = [c.name for c in d.candidates if c.type in ("down_proj", "v_proj")]
        grads = _per_sample_grads(model, enc, names)
        for i, g in enumerate(grads):
            for n in names:
                j = [c.name for c in d.candidates].index(n)
                s2 = torch.linalg.svdvals(g[n]) ** 2
                assert d.total[i][j] == pytest.approx(float(s2.sum()), rel=1e-4)
                assert d.top_sv_share[i][j] == pytest.approx(float(s2.max() / s2.sum()), rel=1e-3)
                p = s2 / s2.sum()
                p = p[p > 0]
                erank = math.exp(float(-(p * p.log()).sum()))
                assert d.effective_rank[i][j] == pytest.approx(erank, rel=1e-3)
                assert 1.0 <= d.effective_rank[i][j] <= len(enc[i].input_ids)


class TestSinks:
    def test_massive_sinks(self, tiny_tokenizer):
        model = make_massive_llama(len(tiny_tokenizer))
        enc, _ = encode_samples(tiny_tokenizer, chat_samples(4), max_length=64)
        every = page_decompose(model, enc, sink="massive", criterion=MassiveCriterion(abs_threshold=0, ratio=1),
                               rank_types=())
        assert [len(p) for p in every.sink_positions] == [len(e.input_ids) for e in enc]
        assert all(r == 0 for row in every.rest_part for r in row)
        never = page_decompose(model, enc, sink="massive", criterion=MassiveCriterion(abs_threshold=1e30),
                               rank_types=())
        assert all(p == [] for p in never.sink_positions)
        flat = [v for row in never.rest_part for v in row]
        assert flat == pytest.approx([v for row in never.total for v in row])
        planted = page_decompose(model, enc, sink="massive", rank_types=())
        # the planted super weight fires on some positions only
        assert 0 < sum(map(len, planted.sink_positions)) < sum(len(e.input_ids) for e in enc)

    def test_first_token_default(self, tiny_model, tiny_tokenizer):
        enc, _ = encode_samples(tiny_tokenizer, chat_samples(3), max_length=64)
        d = page_decompose(tiny_model, enc, rank_types=())
        assert d.sink == "first" and all(p == [0] for p in d.sink_positions)
        doc = json.loads(json.dumps(d.to_dict(model="tiny")))
        assert doc["sink_is_first_token"] and doc["with_sink"]["dominant"].endswith("down_proj")
        assert set(doc["dominant_split"]) >= {"sink_share", "rest_share", "top_sv_share", "name"}


class TestBadInput:
    def test_errors(self, tiny_model, tiny_tokenizer):
        enc, _ = encode_samples(tiny_tokenizer, chat_samples(2), max_length=64)
        with pytest.raises(ConfigError, match="empty"):
            page_decompose(tiny_model, [])
        with pytest.raises(ConfigError, match="sink"):
            page_decompose(tiny_model, enc, sink="last")
        with pytest.raises(ConfigError, match=">= 0"):
            page_probe(tiny_model, enc, exclude_positions=[-1])
        with pytest.raises(ConfigError, match="shape"):
            page_probe(tiny_model, enc, exclude_positions=lambda idx, batch: torch.zeros(1, 1, dtype=torch.bool))

    def test_model_untouched(self, tiny_model, tiny_tokenizer):
        enc, _ = encode_samples(tiny_tokenizer, chat_samples(3), max_length=64)
        before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        page_decompose(tiny_model, enc, sink="massive")
        after = tiny_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in tiny_model.parameters())
        assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == 0


def test_decompose_stage(tiny_model, tiny_tokenizer, chat_jsonl, tmp_path):
    from domlora.cli import main

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "dec"
    assert main(["decompose", "--model", str(folder), "--data", str(chat_jsonl), "--out", str(out), "--samples", "4",
                 "--bootstrap", "50", "--dtype", "float32", "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == {"decompose.json"}
    doc = json.loads((out / "decompose.json").read_text())
    assert doc["bootstrap"]["n_boot"] == 50 and 0 <= doc["bootstrap"]["dom_stability"] <= 1
    assert doc["n_samples"] == 4 and len(doc["modules"]) == 3 * 7
    assert main(["decompose", "--model", str(folder), "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2

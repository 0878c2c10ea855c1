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
        # both assistant turns with their end-of-turn marker, nothing from system / user turns
        assert target_text(tiny_tokenizer, e) == "2 + 3 = 5.<|im_end|>\n10<|im_end|>\n"
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
        assert target_text(tok, e) == "2 + 3 = 5.<|im_end|>\n10<|im_end|>\n"
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

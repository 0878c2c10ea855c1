"""Held-out answer NLL: the training objective on unseen samples, and its evaluation task."""
from __future__ import annotations

import json
import math

import pytest

from conftest import chat_samples
from domlora.evaluate.nll import heldout_nll
from domlora.samples import encode_samples


def test_equals_the_token_weighted_cross_entropy_of_the_assistant_tokens(tiny_model, tiny_tokenizer):
    import torch
    import torch.nn.functional as F

    samples = chat_samples(6)
    doc = heldout_nll(tiny_model, tiny_tokenizer, samples, batch_size=4)
    total, count, means = 0.0, 0, []
    for e in encode_samples(tiny_tokenizer, samples, max_length=2048)[0]:  # one sample at a time, no padding
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, :-1]
        mask = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        ce = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
        total += float(ce)
        count += int(mask.sum())
        means.append(float(ce) / int(mask.sum()))
    assert doc["nll"] == pytest.approx(total / count, rel=1e-5)
    assert doc["nll_per_sample"] == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert doc["n"] == 6 and doc["n_tokens"] == count and doc["stderr"] > 0


def test_padding_and_batch_size_do_not_change_it(tiny_model, tiny_tokenizer):
    samples = chat_samples(7)
    a = heldout_nll(tiny_model, tiny_tokenizer, samples, batch_size=1)
    b = heldout_nll(tiny_model, tiny_tokenizer, samples, batch_size=7)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_nll_task_in_evaluate(tmp_path, tiny_model_dir):
    """`arith_nll` runs beside lm-eval tasks in evaluate(), reads eval.jsonl, and lands in the flat metrics."""
    from domlora.evaluate.run import evaluate

    d = tmp_path / "data" / "arith"
    d.mkdir(parents=True)
    rows = [s | {"question": s["messages"][-2]["content"], "answer": "1"} for s in chat_samples(5)]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = evaluate(model=str(tiny_model_dir), adapter=None, tasks=["arith_nll"], out=tmp_path / "eval.json",
                   data_dir=tmp_path / "data", batch_size=4)
    rec = doc["tasks"]["arith_nll"]
    assert rec["status"] == "success" and rec["n"] == 5
    assert math.isfinite(doc["metrics"]["arith_nll/nll"]) and doc["metrics"]["arith_nll/nll"] > 0
    again = evaluate(model=str(tiny_model_dir), adapter=None, tasks=["arith_nll"], out=tmp_path / "eval.json",
                     data_dir=tmp_path / "data", batch_size=4)
    assert again["tasks"]["arith_nll"] == rec  # a rerun reuses the result

"""Held-out answer negative log-likelihood: the training objective, teacher-forced, on samples never trained on.

Each sample is encoded exactly as training encodes it (`samples.encode_samples`: the prompt as the model
sees it at inference, then the assistant turn and its end-of-turn token); the loss covers the assistant
tokens only. On a 135M model exact match moves in steps of one problem, while this moves with every
token's probability, so it separates placements that exact match cannot.

    doc = heldout_nll(model, tokenizer, read_samples("data/arith/eval.jsonl"))
    doc["nll"]      # nats per assistant token over all samples (token-weighted)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from domlora.samples import encode_samples, iter_batches, model_losses, read_samples

MAX_LENGTH = 2048
"""tokens per sample: long enough that no generated-task sample is cut"""


def heldout_nll(model, tokenizer, samples: Sequence[dict], *, batch_size: int = 8,
                max_length: int = MAX_LENGTH) -> dict:
    """Teacher-forced NLL of the assistant tokens of `samples` (chat dicts with `messages`).

    Returns:
        {"nll": nats per target token over all samples, "nll_per_sample": the mean of per-sample means,
        "stderr": the standard error of that mean, "n": samples used, "n_tokens": target tokens,
        "n_truncated": samples cut at max_length}
    """
    import torch

    encoded, report = encode_samples(tokenizer, list(samples), max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, per_sample = 0.0, 0, []
    try:
        with torch.no_grad():
            for _idx, batch in iter_batches(encoded, batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                                            device=device):
                losses = model_losses(model, batch).double().cpu()
                counts = (batch["loss_mask"] * batch["attention_mask"])[:, 1:].sum(1).double().cpu()
                total += float((losses * counts).sum())
                tokens += int(counts.sum())
                per_sample += losses.tolist()
    finally:
        model.train(was_training)
    n = len(per_sample)
    mean = sum(per_sample) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / (n - 1)) if n > 1 else float("nan")
    return {"nll": total / tokens, "nll_per_sample": mean, "stderr": sd / math.sqrt(n) if n > 1 else None,
            "n": n, "n_tokens": tokens, "n_truncated": report.n_truncated}


def nll_task(lm, eval_file, *, limit: int | None = None) -> dict:
    """An `<dataset>_nll` task for `evaluate`: the held-out NLL of eval.jsonl, in eval.json's task form."""
    doc = heldout_nll(lm.model, lm.tokenizer, read_samples(eval_file, limit=limit))
    return {"n": doc["n"], "n_tokens": doc["n_tokens"], "n_truncated": doc["n_truncated"],
            "metrics": {"nll": {"value": doc["nll"], "stderr": doc["stderr"], "n": doc["n"]},
                        "nll_per_sample": {"value": doc["nll_per_sample"], "stderr": doc["stderr"], "n": doc["n"]}}}

"""Supervised samples: the project's chat JSONL, tokenised with a loss mask on assistant tokens.

One sample per line: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
The loss covers every assistant turn (its content and end-of-turn marker); prompts and
padding are masked. Samples are truncated on the right to `max_length`; one whose
assistant tokens all fall beyond it is skipped and counted, never turned into a NaN.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from domlora.errors import DataError
from domlora.io import iter_jsonl

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# used only when a tokenizer has no chat template of its own
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def validate_sample(obj, where: str) -> list[dict]:
    """Check one sample and return its messages; `where` names it in errors (file:line)."""
    if not isinstance(obj, dict) or "messages" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: expected an object with a `messages` list, found {keys}; fix: write "
                        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn, so there is nothing to compute a loss on; "
                        "fix: add the response as a message with role `assistant`")
    return msgs


def read_samples(path: str | os.PathLike, *, limit: int | None = None) -> list[dict]:
    """Read and validate a chat JSONL file (the first `limit` samples if given).

    Raises:
        DataError: missing/empty file, malformed JSON or schema, with the line number.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist; fix: pass a chat JSONL file (one {{'messages': [...]}} per line)")
    out: list[dict] = []
    for lineno, obj in iter_jsonl(p, error=DataError):
        out.append({"messages": validate_sample(obj, f"{p}:{lineno}")})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{p} holds no samples; fix: write at least one {{'messages': [...]}} line")
    return out


@dataclass
class Encoded:
    """One tokenised sample."""

    input_ids: list[int]
    loss_mask: list[int]
    """1 where the token is a target (assistant); the loss at position t predicts token t"""
    truncated: bool = False


@dataclass
class EncodeReport:
    """What tokenisation did to a set of samples."""

    n_read: int = 0
    n_used: int = 0
    n_truncated: int = 0
    """samples cut at max_length that still kept assistant tokens"""
    n_skipped: int = 0
    """samples whose assistant tokens all fell beyond max_length"""
    skipped: list[int] = field(default_factory=list)
    """indices of skipped samples"""
    max_length: int = 0
    n_target_tokens: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = d["skipped"][:50]
        return d


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the fallback one (in place)."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    # the fallback is passed per call, so the caller's tokenizer is left as it was
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return its text and the character spans of assistant turns."""
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        through = _render(tokenizer, messages[: k + 1])
        if text.startswith(before) and text.startswith(through) and len(through) > len(before):
            spans.append((len(before), len(through)))
        else:  # a template that is not prefix-stable: fall back to locating the content
            start = text.find(m["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise DataError("could not locate an assistant turn in the rendered chat template")
            spans.append((start, start + len(m["content"])))
    return text, spans


def encode_sample(tokenizer, messages: list[dict], *, max_length: int) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    for i, (s, e) in enumerate(offsets):
        if e > s and any(a <= s < b for a, b in spans):
            mask[i] = 1
    truncated = len(ids) > max_length
    return Encoded(input_ids=ids[:max_length], loss_mask=mask[:max_length], truncated=truncated)


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens before the first assistant token (the prompt the model reads before any target)."""
    e = encode_sample(tokenizer, messages, max_length=1 << 62)
    return next((i for i, m in enumerate(e.loss_mask) if m and i > 0), len(e.input_ids))


def encode_samples(tokenizer, samples: Sequence[dict], *, max_length: int) -> tuple[list[Encoded], EncodeReport]:
    """Tokenise samples with the chat template; skip (and count) those left with no target.

    Raises:
        DataError: max_length < 2, or no sample keeps an assistant token within max_length.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    report = EncodeReport(n_read=len(samples), max_length=max_length)
    out: list[Encoded] = []
    for i, s in enumerate(samples):
        e = encode_sample(tokenizer, s["messages"], max_length=max_length)
        # the first token is never a target (nothing predicts it)
        if sum(e.loss_mask[1:]) == 0:
            report.n_skipped += 1
            report.skipped.append(i)
            continue
        report.n_truncated += int(e.truncated)
        report.n_target_tokens += sum(e.loss_mask[1:])
        out.append(e)
    report.n_used = len(out)
    if report.n_skipped:
        logger.warning("%d of %d samples skipped: their assistant tokens all lie beyond max_length=%d",
                       report.n_skipped, report.n_read, max_length)
    if report.n_truncated:
        logger.info("%d of %d samples truncated to max_length=%d", report.n_truncated, report.n_read, max_length)
    if not out:
        shortest = min(prompt_length(tokenizer, s["messages"]) for s in samples)
        raise DataError(f"none of the {report.n_read} samples keeps an assistant token within max_length={max_length}: "
                        f"the shortest prompt is {shortest} tokens; fix: raise max_length above {shortest} "
                        "(room for the prompt and the response), or shorten the prompts")
    return out, report


def collate(encoded: Sequence[Encoded], *, pad_id: int, device=None) -> dict:
    """Right-pad a list of samples into tensors: input_ids, attention_mask, loss_mask."""
    import torch

    T = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(encoded), T), dtype=torch.long)
    lm = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        lm[i, :n] = torch.tensor(e.loss_mask)
    batch = {"input_ids": ids, "attention_mask": att, "loss_mask": lm}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def iter_batches(encoded: Sequence[Encoded], *, batch_size: int, pad_id: int, device=None,
                 sort_by_length: bool = True) -> Iterator[tuple[list[int], dict]]:
    """Yield (sample indices, batch); sorting by length keeps padding small.

    Sorted, ties are broken by the tokens themselves, so each batch holds the same samples in the
    same rows whatever their order in the file."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: (len(encoded[i].input_ids), encoded[i].input_ids, encoded[i].loss_mask))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        yield idx, collate([encoded[i] for i in idx], pad_id=pad_id, device=device)


def per_sample_loss(logits, batch: dict):
    """Mean token cross-entropy over target positions, one value per sample (shape B)."""
    return _mean_target_ce(logits[:, :-1], batch, slice(1, None))


def _mean_target_ce(logits, batch: dict, nxt):
    """Per-sample mean cross-entropy of `logits` (B, P, vocab) against the tokens at positions `nxt`,
    over target (loss-masked, unpadded) tokens only."""
    import torch
    import torch.nn.functional as F

    if logits.dtype in (torch.float16, torch.bfloat16):  # half logits: cross-entropy in float32
        logits = logits.float()
    targets = batch["input_ids"][:, nxt]
    mask = batch["loss_mask"][:, nxt].to(logits.dtype) * batch["attention_mask"][:, nxt].to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape) * mask
    return ce.sum(1) / mask.sum(1).clamp_min(1.0)


def target_positions(batch: dict):
    """Sorted positions t whose logits predict a target token (t + 1) in at least one sample of the batch."""
    need = batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()
    return need.any(0).nonzero().squeeze(-1)


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def model_losses(model, batch: dict):
    """Per-sample mean target cross-entropy (as `per_sample_loss`), with logits only where a target is predicted.

    The vocabulary projection and the cross-entropy run on the target positions alone (via the
    model's `logits_to_keep` where it has one), which saves the (B, T, vocab) logits of the prompt.
    """
    pos = target_positions(batch)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _takes_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=pos).logits
    else:
        logits = model(**kwargs).logits[:, pos]
    return _mean_target_ce(logits, batch, pos + 1)

"""Supervised samples: the project's chat JSONL, tokenised with a loss mask on assistant tokens.

One sample per line: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
The loss covers every assistant turn (its content and end-of-turn marker); prompts, whatever
the template writes after the end-of-turn marker (a newline) and padding are masked.

Samples are tokenised as the model sees them at inference (SPEC section 8): the prompt before
an assistant turn is `apply_chat_template(messages_before, add_generation_prompt=True)`
tokenised on its own (`encode_prompt`, the same function that encodes prompts for generation),
and the turn's response is tokenised on its own. Tokenising the whole rendered conversation
at once would let the generation prompt's last newline merge with a response that starts with
whitespace (code indentation) into a token the model never sees at inference.

Samples are truncated on the right to `max_length`; one whose assistant tokens all fall
beyond it is skipped and counted, never turned into a NaN.
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
    empty: list[int] = []
    for lineno, obj in iter_jsonl(p, error=DataError):
        msgs = validate_sample(obj, f"{p}:{lineno}")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            empty.append(lineno)
        out.append({"messages": msgs})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{p} holds no samples; fix: write at least one {{'messages': [...]}} line")
    if empty:
        shown = ", ".join(f"{p}:{n}" for n in empty[:10]) + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
        logger.warning("%d sample(s) with an empty assistant turn, whose only target is the end-of-turn token: %s; "
                       "fix: drop them or write the response", len(empty), shown)
    return out


@dataclass
class Encoded:
    """One tokenised sample."""

    input_ids: list[int]
    """prompt and response pieces, each tokenised on its own, truncated to max_length"""
    loss_mask: list[int]
    """1 where the token is a target (assistant); the loss at position t predicts token t"""
    truncated: bool = False
    """cut at max_length"""
    differs_from_full_text: bool = False
    """its ids differ from tokenising the whole rendered conversation at once (a token merges
    across a prompt/response boundary there, e.g. the prompt's newline with code indentation)"""


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
    n_differ_from_full_text: int = 0
    """samples read whose ids differ from tokenising the whole rendered conversation at once"""

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


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The inference prompt as text: the chat template with the generation prompt."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes every special token itself (BOS included where it has one)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids the model sees at inference before it answers `messages`.

    `apply_chat_template(messages, add_generation_prompt=True)` tokenised on its own, with no
    special tokens added beyond the template's (as `apply_chat_template(tokenize=True)` does).
    Generation prompts (`prompt_batch`: the arithmetic accuracy of GRPO and sparse-B) are encoded
    here, and training and probe samples (`encode_sample`) tokenise the same text the same way
    for every assistant turn; TRL's GRPO trainer calls `apply_chat_template(tokenize=True)`, which
    gives these ids too. lm-eval's HFLM gives the same ids: it renders the chat context with the same
    call and tokenises it in one piece, adding no BOS when the text starts with one.
    """
    return _ids(tokenizer, prompt_text(tokenizer, messages))


def prompt_batch(tokenizer, prompts: Sequence[list[dict]], *, device=None) -> dict:
    """Left-padded `input_ids` / `attention_mask` of `encode_prompt` for each prompt, ready for `generate`."""
    import torch

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad if pad is not None else 0, dtype=torch.long)
    att = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, T - len(x):] = torch.tensor(x)
            att[i, T - len(x):] = 1
    batch = {"input_ids": input_ids, "attention_mask": att}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


_PROBE_REPLY = "\x00domlora-reply\x00"


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant reply, up to its last non-space character
    (`<|im_end|>` for ChatML, `<end_of_turn>` for Gemma): the end-of-turn marker the model learns
    to emit. Whitespace the template adds after it (a newline) is not part of it."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text = _render(tokenizer, msgs)
    at = text.rfind(_PROBE_REPLY)
    return text[at + len(_PROBE_REPLY):].rstrip() if at >= 0 else ""


def _response_length(region: str, content: str) -> int:
    """How much of an assistant turn's rendered text is response: up to the end of the end-of-turn
    marker, so trailing whitespace after it (a template's newline) is never a target."""
    at = region.find(content) if content else 0
    if at < 0:  # the template rewrote the content (e.g. trimmed it): all but trailing whitespace
        return len(region.rstrip())
    end = at + len(content)
    return end + len(region[end:].rstrip())


def chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into `(text, is_target)` pieces, each tokenised on its own.

    Before each assistant turn the prompt piece runs up to where `prompt_text` of the messages
    before the turn ends (for the first turn it is exactly that text); the response piece is the
    turn's content and its end-of-turn marker; what the template writes after the marker joins
    the next prompt piece. A template whose renders are not prefixes of one another (one that
    rewrites earlier turns) is split by locating each reply's content in the full text instead.

    Raises:
        DataError: an assistant turn that cannot be located in the rendered text.
    """
    text = _render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: k + 1])
        # a reply with nothing before it has no generation prompt (transformers renders no empty conversation)
        before = prompt_text(tokenizer, messages[:k]) if k else None
        if (before is not None and pos <= len(before) < len(through) and text.startswith(before)
                and text.startswith(through)):
            start = len(before)
            stop = start + _response_length(text[start:len(through)], m["content"])
        else:  # not prefix-stable: locate the reply and its end-of-turn marker in the full text
            eot = end_of_turn(tokenizer)
            if m["content"]:
                start = text.find(m["content"], pos)
                stop = start + len(m["content"])
            else:
                start = stop = text.find(eot, pos) if eot else -1
            if start < 0:
                raise DataError(f"could not locate assistant turn {k} in the rendered chat template; fix: use a "
                                "chat template that writes each message's content verbatim")
            if eot and text[stop:].lstrip(" ").startswith(eot):
                stop = text.index(eot, stop) + len(eot)
        pieces += [(text[pos:start], False), (text[start:stop], True)]
        pos = stop
    pieces.append((text[pos:], False))
    return [(t, target) for t, target in pieces if t]


def encode_sample(tokenizer, messages: list[dict], *, max_length: int) -> Encoded:
    """Tokenise one conversation piece by piece (`chat_pieces`), loss mask on the response pieces."""
    ids: list[int] = []
    mask: list[int] = []
    text = ""
    for piece, target in chat_pieces(tokenizer, messages):
        piece_ids = _ids(tokenizer, piece)
        ids += piece_ids
        mask += [int(target)] * len(piece_ids)
        text += piece
    truncated = len(ids) > max_length
    return Encoded(input_ids=ids[:max_length], loss_mask=mask[:max_length], truncated=truncated,
                   differs_from_full_text=ids != _ids(tokenizer, text))


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
        report.n_differ_from_full_text += int(e.differs_from_full_text)
        # the first token is never a target (nothing predicts it)
        if sum(e.loss_mask[1:]) == 0:
            report.n_skipped += 1
            report.skipped.append(i)
            continue
        report.n_truncated += int(e.truncated)
        report.n_target_tokens += sum(e.loss_mask[1:])
        out.append(e)
    report.n_used = len(out)
    if report.n_differ_from_full_text:
        logger.warning("%d of %d samples tokenise differently from their whole rendered text (a token merges across "
                       "a prompt/response boundary there); they are encoded as the model sees them at inference",
                       report.n_differ_from_full_text, report.n_read)
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


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (the LM head on chosen positions only)."""
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
    if takes_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=pos).logits
    else:
        logits = model(**kwargs).logits[:, pos]
    return _mean_target_ce(logits, batch, pos + 1)

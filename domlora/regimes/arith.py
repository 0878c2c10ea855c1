"""The arithmetic task as the sparse-B and GRPO studies use it: prompt rows, batched chat
generation, and greedy exact match of the final `#### N` (scored by `domlora.evaluate.answers`)."""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domlora.errors import ConfigError, DataError
from domlora.evaluate.answers import final_int, is_correct
from domlora.io import iter_jsonl
from domlora.samples import ensure_chat_template, prompt_batch

logger = logging.getLogger(__name__)


def as_int(x: Any) -> int | None:
    try:
        return int(str(x).strip().replace(",", ""))
    except ValueError:
        return None



def read_prompts(path: str | os.PathLike, *, limit: int | None = None) -> list[dict]:
    """Prompt rows `{"prompt": [messages...], "answer": str}` from a chat or eval JSONL file.

    A row with `question` + `answer` (the eval split) becomes a one-turn prompt; a chat row
    becomes its messages up to the last assistant turn, answer = that turn's `#### N`.

    Raises:
        DataError: missing file, or rows with no checkable integer answer.
    """

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist; fix: run `domlora prepare --dataset arith` first")
    rows, bad = [], 0
    for _lineno, obj in iter_jsonl(p, error=DataError):
        if isinstance(obj, dict) and "question" in obj and "answer" in obj:
            prompt = [{"role": "user", "content": str(obj["question"])}]
            answer = obj["answer"]
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"),
                       default=None)
            if last is None or last == 0:
                bad += 1
                continue
            prompt = msgs[:last]
            answer = final_int(str(msgs[last].get("content", "")))
        else:
            bad += 1
            continue
        if as_int(answer) is None:
            bad += 1
            continue
        rows.append({"prompt": prompt, "answer": str(as_int(answer))})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{p} has no row with a checkable integer answer ({bad} rows skipped): expected "
                        "eval rows with `question` + `answer`, or chat rows whose last assistant turn ends with "
                        "`#### <int>`; fix: prepare the arith dataset (`domlora prepare --dataset arith`)")
    if bad:
        logger.warning("%s: %d rows without a checkable integer answer were skipped", p, bad)
    return rows



def _encode_prompts(tokenizer, prompts: Sequence[list[dict]], device):
    """Left-padded inference prompts (`samples.encode_prompt`: the ids training and the probe use too)."""
    ensure_chat_template(tokenizer)
    return prompt_batch(tokenizer, prompts, device=device)



def generate(model, tokenizer, prompts: Sequence[list[dict]], *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, num_return_sequences: int = 1, seed: int | None = None):
    """Batched chat generation; returns (prompt batch, generated ids [B*n, T_new], texts)."""
    import torch

    device = next(model.parameters()).device
    enc = _encode_prompts(tokenizer, prompts, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                          "num_return_sequences": num_return_sequences}
    if do_sample:
        kw |= {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    else:
        kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return enc, new, texts



def arith_accuracy(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 128, batch_size: int = 8,
                   keep_samples: int = 5, merge: bool = True, show_progress: bool = False) -> dict:
    """Greedy exact match of the final `#### N` on prompt rows (see `read_prompts`).

    With `merge`, a LoRA adapter is folded into the base weights while generating (no per-token
    adapter matmuls) and unfolded after.

    Returns accuracy, its standard error, the parse rate, n and a few sample completions.
    """
    if not rows:
        raise DataError("no evaluation rows; fix: pass an eval file with `question` + `answer` rows")
    if batch_size < 1:
        raise ConfigError(f"eval batch size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    merged = False
    if merge and hasattr(model, "merge_adapter") and not getattr(model, "_adapters_disabled", False):
        model.merge_adapter()
        merged = True
    t0 = time.perf_counter()
    correct = parsed = 0
    samples = []
    it = range(0, len(rows), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval arith")
    try:
        for i in it:
            chunk = rows[i:i + batch_size]
            _, _, texts = generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens)
            for r, t in zip(chunk, texts, strict=True):
                ok = is_correct(t, r["answer"])
                parsed += final_int(t) is not None
                correct += ok
                if len(samples) < keep_samples:
                    samples.append({"answer": r["answer"], "completion": t, "correct": ok})
    finally:
        if merged:
            model.unmerge_adapter()
        model.train(was_training)
    n = len(rows)
    acc = correct / n
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n) if n > 1 else 0.0, "n": n,
            "correct": correct, "parse_rate": parsed / n, "seconds": time.perf_counter() - t0,
            "max_new_tokens": max_new_tokens, "samples": samples}

"""The Python API: probe your own model and data, get a PEFT `LoraConfig` for the dominant module.

    from domlora import dominant_lora_config
    config = dominant_lora_config(model, tokenizer, "train.jsonl", r=64, lora_alpha=128)
    model = peft.get_peft_model(model, config)
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from domlora.placement import Placement, PlacementSpec, select
from domlora.probes.page import page_probe
from domlora.samples import encode_samples, read_samples, validate_sample
from domlora.probes.summary import page_summary


def _as_samples(data, *, limit: int) -> list[dict]:
    if isinstance(data, (str, os.PathLike)):
        return read_samples(data, limit=limit)
    out = []
    for i, s in enumerate(data):
        out.append({"messages": validate_sample(s, f"sample {i}")})
        if len(out) >= limit:
            break
    return out


def probe_page(model, tokenizer, data: str | os.PathLike | Sequence[dict], *, samples: int = 32,
               max_length: int = 512, alpha: float = 16.0, rank: int = 8, batch_size: int = 1,
               show_progress: bool = False, model_name: str | None = None) -> dict:
    """Run the PAGE probe and return the `page.json` document.

    Args:
        model, tokenizer: a `transformers` causal LM and its tokenizer.
        data: a chat JSONL path or a list of `{"messages": [...]}` samples; the first `samples` are used.
    """
    chosen = _as_samples(data, limit=samples)
    encoded, report = encode_samples(tokenizer, chosen, max_length=max_length)
    result = page_probe(model, encoded, alpha=alpha, rank=rank, batch_size=batch_size, show_progress=show_progress)
    result.encode_report = report
    name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    return page_summary(result, model=name)


def place(model, tokenizer, data, *, strategy: str = "dom", k: int = 3, **probe_kwargs) -> Placement:
    """Probe and apply a PAGE-based strategy (`dom`, `page_argmax`, `page_topk`)."""
    doc = probe_page(model, tokenizer, data, **probe_kwargs)
    return select(PlacementSpec(strategy=strategy, k=k), probe=doc)


def dominant_lora_config(model, tokenizer, data, *, r: int = 64, lora_alpha: float = 128,
                         strategy: str = "dom", k: int = 3, samples: int = 32, max_length: int = 512,
                         batch_size: int = 1, show_progress: bool = False, **lora_kwargs):
    """A `peft.LoraConfig` whose `target_modules` is the dominant module of `model` on `data`.

    Extra keyword arguments go to `LoraConfig` (e.g. `lora_dropout`, `use_dora=True`).
    """
    from peft import LoraConfig

    placement = place(model, tokenizer, data, strategy=strategy, k=k, samples=samples, max_length=max_length,
                      alpha=lora_alpha, rank=r, batch_size=batch_size, show_progress=show_progress)
    lora_kwargs.setdefault("lora_dropout", 0.0)
    lora_kwargs.setdefault("bias", "none")
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(placement.modules), **lora_kwargs)

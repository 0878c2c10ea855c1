"""Adapters: PEFT configs per LoRA variant attached at exact module names (`variants`), NoRM's
post-training reduction (`norm`) and IST's (and its RST ablation's) layer sampling during training (`ist`)."""
from __future__ import annotations

from typing import Literal, get_args

Variant = Literal["lora", "dora", "lora_plus", "adalora", "rslora", "gralora", "norm", "full"]
"""an adapter variant: the `variant` of a `train.config.TrainConfig`"""
VARIANTS: tuple[str, ...] = get_args(Variant)

"""Argument blocks shared by the commands that run a model over a probe set (probe, diagnose, decompose,
checkpoints probe): one spelling, one default and one help text per flag."""
from __future__ import annotations

import argparse

MODEL_HELP = "`embedded`, `embedded-gemma`, `embedded-qwen` (opt-in), a hub id or a local checkpoint folder"


def add_model(p: argparse.ArgumentParser, *, required: bool = True, dtypes: str = "float64") -> None:
    """--model, --dtype, --device, --trust-remote-code."""
    if required:
        p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help=f"float32 (CPU default), bfloat16 (GPU default), {dtypes}")
    add_device(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def add_samples(p: argparse.ArgumentParser, *, data_help: str = "chat JSONL probe set ({'messages': [...]} per line)",
                samples_help: str = "probe samples N (the first N of --data)", max_length: int = 256) -> None:
    """--data, --samples, --max-length."""
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--samples", type=int, default=32, help=samples_help)
    p.add_argument("--max-length", type=int, default=max_length, help="truncate samples to this many tokens")


def add_lora_shape(p: argparse.ArgumentParser) -> None:
    """--alpha, --rank: the LoRA shape PAGE is computed for (it rescales PAGE per d_in only)."""
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha PAGE is computed for")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank PAGE is computed for")

"""Candidate modules: every projection of every Transformer block, with a type label.

A module keeps its real, fully-qualified name (what PEFT's `target_modules` matches
exactly) and gets a type from the paper's vocabulary: q/k/v/o_proj, gate/up/down_proj,
plus the fused `qkv_proj` and `gate_up_proj` (Phi-3, GPT-2's `c_attn`).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from domlora.errors import ModelError

ATTN_TYPES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
FFN_TYPES = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
TYPES = ATTN_TYPES + FFN_TYPES
# the seven types of a Llama block, in the paper's order
PAPER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# leaf name (or parent.leaf) -> type label
_LEAF_TYPES = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
    "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
    "qkv_proj": "qkv_proj", "gate_up_proj": "gate_up_proj",
    # GPT-2 (Conv1D)
    "attn.c_attn": "qkv_proj", "attn.c_proj": "o_proj", "mlp.c_fc": "up_proj", "mlp.c_proj": "down_proj",
    # GPT-NeoX / Falcon / OPT / Phi-2 style names
    "query_key_value": "qkv_proj", "dense_h_to_4h": "up_proj", "dense_4h_to_h": "down_proj",
    "attention.dense": "o_proj", "self_attention.dense": "o_proj", "self_attn.dense": "o_proj",
    "out_proj": "o_proj", "mlp.fc1": "up_proj", "mlp.fc2": "down_proj",
}
# a block's index follows one of these container names
BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")
# PEFT prefixes the wrapped model's module names with this
PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """A module name relative to the base model (PEFT's `base_model.model.` prefix removed)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass(frozen=True)
class Candidate:
    """One adaptable projection."""

    name: str
    """fully-qualified module name, e.g. `model.layers.6.mlp.down_proj`"""
    layer: int
    """index of its Transformer block"""
    type: str
    """type label, one of `TYPES`"""
    d_in: int
    """input features"""
    d_out: int
    """output features"""
    conv1d: bool = False
    """GPT-2 style Conv1D (weight stored d_in x d_out)"""

    def to_dict(self) -> dict:
        return asdict(self)


def _is_projection(module) -> tuple[bool, bool]:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True, False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    if Conv1D and isinstance(module, Conv1D):
        return True, True
    return False, False


def _type_of(name: str) -> str | None:
    parts = name.split(".")
    two = ".".join(parts[-2:])
    return _LEAF_TYPES.get(two) or _LEAF_TYPES.get(parts[-1])


def find_candidates(model, *, types: Collection[str] | None = None) -> list[Candidate]:
    """List every projection of every block, ordered by layer then type.

    Args:
        model: a `transformers` causal LM (or a PEFT wrapper of one; the base names are used).
        types: keep only these type labels.

    Raises:
        ModelError: nothing recognisable; the message lists the linear layers that were found.
    """
    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    found: list[Candidate] = []
    linear_names: list[str] = []
    for name, module in base.named_modules():
        is_proj, conv = _is_projection(module)
        if not is_proj or ".lora_" in name:  # PEFT's own adapter layers are not candidates
            continue
        # a PEFT-wrapped projection keeps its weight in `<name>.base_layer`; report the wrapped name
        name = name.removesuffix(".base_layer")
        linear_names.append(name)
        m = BLOCK_RE.search(name)
        kind = _type_of(name)
        if m is None or kind is None:
            continue
        w = module.weight
        d_in, d_out = (w.shape[0], w.shape[1]) if conv else (w.shape[1], w.shape[0])
        found.append(Candidate(name=name, layer=int(m.group(1)), type=kind, d_in=int(d_in),
                               d_out=int(d_out), conv1d=conv))
    if not found:
        shown = ", ".join(linear_names[:12]) or "none"
        more = f" (+{len(linear_names) - 12} more)" if len(linear_names) > 12 else ""
        raise ModelError(
            f"no adaptable projections found in {type(base).__name__}: expected names like "
            f"`layers.N.self_attn.q_proj` / `layers.N.mlp.down_proj` (or GPT-2 `h.N.attn.c_attn`); "
            f"linear layers found: {shown}{more}. Fix: use a decoder LM with a supported architecture "
            "(Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3, GPT-2)"
        )
    if types is not None:
        unknown = set(types) - set(TYPES)
        if unknown:
            raise ModelError(f"unknown module types {sorted(unknown)}; valid: {', '.join(TYPES)}")
        found = [c for c in found if c.type in types]
    order = {t: i for i, t in enumerate(TYPES)}
    found.sort(key=lambda c: (c.layer, order[c.type], c.name))
    return found


def num_layers(candidates: Sequence[Candidate]) -> int:
    return max(c.layer for c in candidates) + 1


def types_present(candidates: Sequence[Candidate]) -> list[str]:
    present = {c.type for c in candidates}
    return [t for t in TYPES if t in present]

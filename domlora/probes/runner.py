"""One pass over a probe set with hooks: the machinery every step-0 signal shares.

A *collector* attaches hooks to the model and turns what they see into one signal (PAGE's
per-sample gradient norms, PLoP's NFN, the activation statistics). `run_pass` runs the probe
batches once: a forward pass, plus an activation-only backward (weights frozen, the input
embeddings require grad) when some collector needs the gradients of module outputs. The model
is left as it was: parameters, `requires_grad` flags, training flag, hooks.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from domlora.errors import ConfigError
from domlora.modules import Candidate
from domlora.samples import Encoded, iter_batches, model_losses, takes_logits_to_keep

logger = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What collectors need to know about the model and the probe set before the pass."""

    model: Any
    modules: dict
    """name -> module"""
    device: Any
    n_samples: int
    max_length: int
    """tokens of the longest sample"""
    encoded: Sequence[Encoded] = ()
    """the probe set, in probe-set order"""
    group: dict[str, int] = field(default_factory=dict)
    """candidate name -> id shared by the modules that read the very same input tensor (q/k/v, gate/up)"""
    calls: dict[str, int] = field(default_factory=dict)
    """candidate name -> calls per forward pass (1 unless weights are shared)"""


class Collector(Protocol):
    """One signal computed from hooks during the pass."""

    needs_backward: bool
    candidates: list[Candidate]

    def attach(self, ctx: PassContext) -> list:
        """Register hooks; return their handles (the runner removes them)."""

    def start_batch(self, idx: list[int], batch: dict) -> None:
        """Called before the forward pass of a batch (`idx`: sample indices in probe-set order)."""

    def end_batch(self) -> None:
        """Called after the batch's forward (and backward)."""


@dataclass
class PassStats:
    """How the pass went."""

    seconds: float
    batch_size: int
    n_batches: int
    n_tokens: int
    """real (unpadded) tokens"""
    n_padded: int
    """batch x length slots, padding included"""
    backward: bool


def input_groups(model, modules: dict, cands: Sequence[Candidate], input_ids, device) -> tuple[list[int], list[int]]:
    """Per candidate: a group id shared by modules that read the same input tensor, and its calls per pass.

    One dry forward on the first tokens of a sample; modules that never run get a group of their own.
    """
    import torch

    group = [-1 - j for j in range(len(cands))]
    keys: dict = {}
    calls = [0] * len(cands)
    held = []  # keep every input alive, so no address is reused within the pass

    def hook(j: int):
        def fn(_mod, inputs, _out):
            x = inputs[0]
            held.append(x)
            calls[j] += 1
            group[j] = keys.setdefault((x.data_ptr(), tuple(x.shape), tuple(x.stride())), len(keys))
        return fn

    handles = [modules[c.name].register_forward_hook(hook(j)) for j, c in enumerate(cands)]
    try:
        with torch.no_grad():
            forward_only(model, {"input_ids": torch.tensor([list(input_ids[:4])], device=device)})
    finally:
        for h in handles:
            h.remove()
    return group, calls


def forward_only(model, batch: dict):
    """A forward pass for the hooks alone: the logits of the last position only, where the model allows it."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)


def _input_embedding_requires_grad(model):
    emb = model.get_input_embeddings()
    return emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


def run_pass(model, encoded: Sequence[Encoded], collectors: Sequence[Collector], *, batch_size: int,
             show_progress: bool = False, desc: str = "probe") -> PassStats:
    """Run the probe batches once through the model with every collector's hooks attached.

    Batches are length-sorted (`samples.iter_batches`), so padding stays small and a batch's
    contents do not depend on the order of the samples in the file.

    Raises:
        ConfigError: an empty probe set, a batch size < 1, candidates not in the model, or a
            non-finite probe loss.
    """
    import torch
    from tqdm.auto import tqdm

    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample with an assistant turn")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    modules = dict(model.named_modules())
    names: dict[str, Candidate] = {}
    for col in collectors:
        for c in col.candidates:
            names.setdefault(c.name, c)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"modules not in this model: {missing[:5]}")
    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    backward = any(col.needs_backward for col in collectors)
    ctx = PassContext(model=model, modules=modules, device=device, n_samples=len(encoded),
                      max_length=max(len(e.input_ids) for e in encoded), encoded=encoded)

    # freeze every parameter while probing (a user's model may be trainable), restore afterwards
    trainable = [p for p in model.parameters() if p.requires_grad]
    had_grad = {id(p) for p in model.parameters() if p.grad is not None}
    for p in trainable:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    handles = []
    n_batches = n_tokens = n_padded = 0
    t0 = time.perf_counter()
    try:
        cands = list(names.values())
        group, calls = input_groups(model, modules, cands, encoded[0].input_ids, device)
        ctx.group = {c.name: g for c, g in zip(cands, group)}
        ctx.calls = {c.name: k for c, k in zip(cands, calls)}
        for col in collectors:
            handles += col.attach(ctx)
        if backward:
            handles.append(_input_embedding_requires_grad(model))
        total = -(-len(encoded) // batch_size)
        batches = iter_batches(encoded, batch_size=batch_size, pad_id=pad_id, device=device)
        for idx, batch in tqdm(batches, total=total, desc=desc, disable=not show_progress, unit="batch"):
            n_batches += 1
            n_tokens += sum(len(encoded[i].input_ids) for i in idx)
            n_padded += batch["input_ids"].numel()
            for col in collectors:
                col.start_batch(idx, batch)
            if backward:
                with torch.enable_grad():
                    losses = model_losses(model, batch)  # logits only where a target is predicted
                    if not torch.isfinite(losses).all():
                        raise ConfigError("the probe loss is not finite; fix: check the model dtype "
                                          "(use float32 on CPU)")
                    losses.sum().backward()
                del losses
            else:
                with torch.no_grad():
                    forward_only(model, batch)
            for col in collectors:
                col.end_batch()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    seconds = time.perf_counter() - t0
    leaked = [name for name, p in model.named_parameters() if p.grad is not None and id(p) not in had_grad]
    if leaked:  # pragma: no cover - guards the no-weight-gradient contract
        raise RuntimeError(f"the probe allocated weight gradients: {leaked[:3]}")
    return PassStats(seconds=seconds, batch_size=batch_size, n_batches=n_batches, n_tokens=n_tokens,
                     n_padded=n_padded, backward=backward)

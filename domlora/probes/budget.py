"""How many probe samples go in one batch: the pass's memory, estimated from the model's shapes.

The probe pass holds, per batch, (1) the activations autograd keeps for the activation-only
backward, per token of the padded batch, (2) what PAGE's hooks keep of each layer input (the
ghost norm's T x T Gram per input group, or X itself where the direct product is cheaper) and
(3) the logits at the target positions with their log-softmax and gradient, per row and target
position. `MemoryModel` prices each from the config (hidden size, attention, key/value and FFN
widths, layers, vocabulary, dtype); `plan_batch_size` takes the largest batch whose worst batch
of the length-sorted probe set fits a budget. The coefficients were measured (docs/probe.md).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.models import available_memory as ram_available
from domlora.probes.page import _cheaper, _row_blocks
from domlora.samples import Encoded

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.5
"""share of the free memory (RAM on CPU, the GPU's on CUDA) the probe's activations may use"""

CPU_BATCH_TOKENS = 1024
"""on a CPU, `auto` also keeps each batch within this many (padded) tokens: beyond about a thousand tokens
a batch gets no faster per token, it gets slower (caches; measured on the arith probe set: batch 8 of
~124-token samples 0.84x the time of batch 1, batch 16 0.92x, batch 32 1.13x; docs/probe.md)"""

SAVED_HIDDEN = 2.0
"""values autograd keeps per layer and token for the activation-only backward, in units of the hidden size
(the inputs of the two norms); with the next three, the count `torch.autograd.graph.saved_tensors_hooks` gives
for SmolLM2 (Llama) to 0.3% (docs/probe.md)"""
SAVED_ATTN = 2.0
"""... in units of the attention width, heads x head dim (the query and the attention output)"""
SAVED_KV = 2.0
"""... in units of the key/value width (key and value)"""
SAVED_FFN = 3.0
"""... in units of the FFN width (gate, up and the activation of gate)"""
PEAK_FACTOR = 1.75
"""peak memory of the pass over what autograd keeps: gradients in flight, per-layer temporaries and the
allocator's slack (measured on the CPU: 1.45-1.9x, docs/probe.md)"""
LOGIT_COPIES = 3.0
"""per target position and row, float32 vocabulary-sized values: the logits, the log-softmax kept for the
backward and their gradient"""


@dataclass(frozen=True)
class Shapes:
    """The sizes the pass's memory depends on, read from a model config."""

    hidden: int
    """residual stream width"""
    ffn: int
    """FFN inner width"""
    kv: int
    """key / value projection width"""
    attn: int
    """attention output width (heads x head dim; the o_proj input)"""
    layers: int
    """Transformer blocks"""
    vocab: int
    """vocabulary size (logits per target position)"""


def shapes_of(config) -> Shapes:
    """`Shapes` from a Hugging Face config (Llama/Qwen/Mistral/Gemma/Phi-3 names, and GPT-2's).

    Raises:
        ConfigError: a config without a hidden size or layer count.
    """
    def get(*names, default=None):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        raise ConfigError(f"cannot read the hidden size / layer count of a {type(config).__name__}; fix: pass "
                          "--batch-size N instead of auto")
    heads = get("num_attention_heads", "n_head", default=1)
    head_dim = get("head_dim", default=hidden // max(heads, 1))
    kv_heads = get("num_key_value_heads", default=heads)
    ffn = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    return Shapes(hidden=int(hidden), ffn=int(ffn), kv=int(kv_heads * head_dim), attn=int(heads * head_dim),
                  layers=int(layers), vocab=int(get("vocab_size", default=0)))


def _elem_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryModel:
    """Bytes the probe pass holds for one batch (see the module docstring)."""

    shapes: Shapes
    elem: int
    """bytes per activation value (the model's dtype)"""
    acc: int
    """bytes per value PAGE's hooks keep (float32, or float64 for a float64 model)"""
    page: bool
    """a backward pass and PAGE's kept inputs (False: forward only, nothing kept across layers)"""

    @property
    def saved_per_token(self) -> float:
        """bytes autograd keeps per token for the activation-only backward (all layers)"""
        s = self.shapes
        return float(self.elem * s.layers * (SAVED_HIDDEN * s.hidden + SAVED_ATTN * s.attn + SAVED_KV * s.kv
                                             + SAVED_FFN * s.ffn))

    @property
    def per_token(self) -> float:
        """peak bytes per token of the padded batch (forward only: one layer's values at a time)"""
        layers = self.shapes.layers if self.page else 1
        return PEAK_FACTOR * self.saved_per_token * layers / self.shapes.layers

    def kept_inputs(self, T: int) -> float:
        """PAGE's kept inputs per sample of length T (padded): per input group the cheaper of the ghost
        norm's lower block-triangular Gram and X itself, as `page._cheaper` chooses."""
        if not self.page:
            return 0.0
        s = self.shapes
        k = len(_row_blocks(T))
        tri = (k + 1) / (2 * k)  # the lower block triangle of a k x k block grid
        total = 0.0
        for d_in, d_out in ((s.hidden, s.attn + 2 * s.kv), (s.attn, s.hidden), (s.hidden, 2 * s.ffn),
                            (s.ffn, s.hidden)):
            total += T * T * tri if _cheaper(T, d_in, d_out) == "ghost" else T * d_in
        return self.acc * s.layers * total

    @property
    def per_logit_row(self) -> float:
        """bytes per (row, target position) of the logits: vocab x float32 x copies"""
        return float(4 * LOGIT_COPIES * self.shapes.vocab)

    def batch_bytes(self, batch: Sequence[Encoded]) -> float:
        """Estimated peak of one batch (right-padded to its longest sample)."""
        T = max(len(e.input_ids) for e in batch)
        B = len(batch)
        positions = set()
        for e in batch:
            positions.update(t - 1 for t in range(1, len(e.loss_mask)) if e.loss_mask[t])
        n_logits = B * len(positions) if self.page else B
        return B * T * self.per_token + B * self.kept_inputs(T) + n_logits * self.per_logit_row

    def per_token_at(self, T: int) -> float:
        """Bytes per token at length T with every position a target (the upper bound docs quote)."""
        return self.per_token + self.kept_inputs(T) / T + self.per_logit_row


def memory_model(config, *, dtype, page: bool = True) -> MemoryModel:
    """The `MemoryModel` of a model config at `dtype` (a torch dtype)."""
    import torch

    elem = _elem_bytes(dtype)
    return MemoryModel(shapes=shapes_of(config), elem=elem, acc=8 if dtype == torch.float64 else 4, page=page)


def _sorted_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    # the same order as samples.iter_batches
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), encoded[i].input_ids,
                                                      encoded[i].loss_mask))
    return [[encoded[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def worst_batch_bytes(mm: MemoryModel, encoded: Sequence[Encoded], batch_size: int) -> float:
    """The largest `batch_bytes` over the length-sorted batches of `encoded`."""
    return max(mm.batch_bytes(b) for b in _sorted_batches(encoded, batch_size))


def worst_batch_tokens(encoded: Sequence[Encoded], batch_size: int) -> int:
    """The largest batch x length (padding included) over the length-sorted batches of `encoded`."""
    return max(len(b) * max(len(e.input_ids) for e in b) for b in _sorted_batches(encoded, batch_size))


def largest_fitting(mm: MemoryModel, encoded: Sequence[Encoded], budget: float) -> int:
    """The largest batch size whose every batch fits `budget` bytes (0: not even one sample fits)."""
    best = 0
    for bs in range(1, len(encoded) + 1):
        if worst_batch_bytes(mm, encoded, bs) <= budget:
            best = bs
    return best


def available_memory(device) -> int:
    """Free bytes where the pass runs: the GPU's free memory, or the RAM the kernel calls available."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return ram_available()


def weight_bytes(config, *, dtype, trust_remote_code: bool = False) -> int:
    """Bytes of the model's parameters at `dtype`, counted on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()) * _elem_bytes(dtype)


@dataclass(frozen=True)
class BatchPlan:
    """The batch size of a probe pass and the memory arithmetic behind it."""

    batch_size: int
    largest_fitting: int
    """the largest batch size whose every batch fits the budget"""
    budget_bytes: float
    """the memory fraction of what was free (less the weights, when they were not loaded yet)"""
    worst_batch_bytes: float
    """the estimated peak of the largest batch at `batch_size`"""
    bytes_per_token: float
    """the estimate per token of the longest sample, every position a target (docs/probe.md)"""
    auto: bool
    """chosen here (True) or given (False)"""
    max_batch_tokens: int | None = None
    """the cap on a batch's padded tokens `auto` also kept to (CPU), or None"""

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "auto": self.auto, "largest_fitting": self.largest_fitting,
                "max_batch_tokens": self.max_batch_tokens,
                "budget_mb": round(self.budget_bytes / 2**20, 1),
                "worst_batch_mb": round(self.worst_batch_bytes / 2**20, 1),
                "bytes_per_token": round(self.bytes_per_token)}


def check_batch_size(batch_size, *, name: str = "--batch-size") -> int | str:
    """`batch_size` if it is `auto` or an integer >= 1 (a bool is not); else a ConfigError naming `name`."""
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"{name} must be >= 1 or auto, got {batch_size!r}")
    return batch_size


def plan_batch_size(mm: MemoryModel, encoded: Sequence[Encoded], *, batch_size: int | str = "auto",
                    available: float, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                    reserved: float = 0.0, max_batch_tokens: int | None = None) -> BatchPlan:
    """Pick (`auto`) or check a batch size against `memory_fraction * (available - reserved)`.

    `auto` is the largest batch size whose every batch fits the budget and, with `max_batch_tokens`
    (`CPU_BATCH_TOKENS` on a CPU), holds at most that many padded tokens (at least one sample).

    Args:
        mm: the pass's memory model.
        encoded: the probe set (its lengths and target positions decide each batch's size).
        batch_size: `auto` or a number to check.
        available: free bytes (`available_memory`).
        reserved: bytes still to come out of `available` (the weights, when the model is not loaded yet).

    Raises:
        ConfigError: a bad batch size or fraction; a given batch size whose largest batch does not fit
            (the message names the largest that does); not even one sample fits.
    """
    if not (isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1):
        raise ConfigError(f"memory fraction must be in (0, 1], got {memory_fraction!r}")
    auto = check_batch_size(batch_size) == "auto"
    gib = 2**30
    if reserved and available < reserved:
        raise ConfigError(f"the model's weights alone need {reserved / gib:.2f} GiB and {available / gib:.2f} GiB is "
                          "free: refused before loading; fix: free memory, or load it in a smaller dtype (bfloat16 "
                          "halves float32's need)")
    budget = memory_fraction * max(available - reserved, 0.0)
    fits = largest_fitting(mm, encoded, budget)
    T = max(len(e.input_ids) for e in encoded)
    per_token = mm.per_token_at(T)
    if fits == 0:
        one = worst_batch_bytes(mm, encoded, 1)
        raise ConfigError(f"one sample of {T} tokens needs about {one / gib:.2f} GiB, over the memory budget of "
                          f"{budget / gib:.2f} GiB ({memory_fraction:g} of {max(available - reserved, 0) / gib:.2f} "
                          "GiB free after the weights); fix: lower --max-length, raise --memory-fraction, or free "
                          "memory")
    chosen = fits if auto else int(batch_size)
    if auto and max_batch_tokens:
        chosen = max([1] + [bs for bs in range(1, fits + 1) if worst_batch_tokens(encoded, bs) <= max_batch_tokens])
    worst = worst_batch_bytes(mm, encoded, chosen)
    if not auto and worst > budget:
        raise ConfigError(f"--batch-size {chosen} needs about {worst / gib:.2f} GiB for its largest batch, over the "
                          f"memory budget of {budget / gib:.2f} GiB ({memory_fraction:g} of the free memory); the "
                          f"largest batch size that fits is {fits}; fix: pass --batch-size {fits} (or auto), or "
                          "raise --memory-fraction")
    return BatchPlan(batch_size=chosen, largest_fitting=fits, budget_bytes=budget, worst_batch_bytes=worst,
                     bytes_per_token=per_token, auto=auto, max_batch_tokens=max_batch_tokens if auto else None)


def plan_on_device(mm: MemoryModel, encoded: Sequence[Encoded], *, batch_size: int | str, device,
                   memory_fraction: float = DEFAULT_MEMORY_FRACTION, reserved: float = 0.0) -> BatchPlan:
    """`plan_batch_size` against `device`'s free memory, with `CPU_BATCH_TOKENS` on a CPU; logs the choice."""
    import torch

    plan = plan_batch_size(mm, encoded, batch_size=batch_size, available=available_memory(device),
                           memory_fraction=memory_fraction, reserved=reserved,
                           max_batch_tokens=CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else None)
    logger.info("batch size %d (%s; largest that fits %d; budget %.2f GiB)", plan.batch_size,
                "auto" if plan.auto else "given", plan.largest_fitting, plan.budget_bytes / 2**30)
    return plan

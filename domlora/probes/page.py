"""PAGE: Projected Adapter Gradient Energy (DomLoRA paper, Sec. 3.1).

For module m with weight W (d_out x d_in) and sample i, `G_i = dL_i/dW = D_i^T X_i`
where X_i (T x d_in) are the module's inputs and D_i (T x d_out) the loss gradients of
its outputs. `S_m = mean_i ||G_i||_F^2`, and for a fresh LoRA (B = 0, A Kaiming-uniform
as PEFT initialises it) `PAGE_m = alpha^2 S_m / (3 r d_in)`.

No weight gradient is ever allocated: weights stay frozen, the input embeddings are made
to require grad so backward runs through activations only. Per module a forward hook reduces
its input X and a tensor hook on its output receives D, turning the pair into per-sample
norms by the cheaper of the direct product and the ghost-norm identity
`||D^T X||_F^2 = sum_{t,s} (X X^T)_{ts} (D D^T)_{ts}`. For the ghost norm the forward hook
keeps only the (masked, lower block-triangular) Gram X X^T, shared by the modules that read
the same input (q/k/v, gate/up), so X is not held until the backward pass. The hooks are a
`PageCollector`, run by `probes.runner.run_pass` alone (`page_probe`) or in the one pass that
also gives NFN and the activation statistics (`probes.step0.step0_probe`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from domlora.errors import ConfigError
from domlora.modules import Candidate, find_candidates
from domlora.probes.runner import run_pass
from domlora.samples import EncodeReport, Encoded

logger = logging.getLogger(__name__)


def page_closed_form(S: float, *, alpha: float, rank: int, d_in: int) -> float:
    """Expected initial LoRA-B gradient energy: alpha^2 S / (3 r d_in)."""
    return alpha * alpha * S / (3.0 * rank * d_in)


def check_lora_shape(alpha: float, rank: int) -> None:
    if not (isinstance(rank, int) and rank > 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")


def _cheaper(T: int, d_in: int, d_out: int) -> str:
    """`ghost` when T^2 (d_in + d_out) < T d_in d_out, the direct product otherwise.

    d_out is the summed width of every module reading the same input: their ghost norms share
    one X X^T, so e.g. q/k/v or gate/up pay for it once.
    """
    return "ghost" if T * (d_in + d_out) < d_in * d_out else "direct"


def per_sample_sq_norms(X, D, *, method: str = "auto"):
    """||D_i^T X_i||_F^2 for each sample i; X: (B,T,d_in), D: (B,T,d_out), padded rows zero.

    `auto` picks the cheaper of the direct product (T d_in d_out per sample) and the
    ghost norm (T^2 (d_in + d_out)).
    """
    import torch

    B, T, d_in = X.shape
    d_out = D.shape[-1]
    if method == "auto":
        method = _cheaper(T, d_in, d_out)
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    X = X.to(acc)
    D = D.to(acc)
    if method == "ghost":
        xx = torch.bmm(X, X.transpose(1, 2))
        dd = torch.bmm(D, D.transpose(1, 2))
        return (xx * dd).sum(dim=(1, 2))
    # direct: one sample at a time keeps the d_out x d_in product small
    return torch.stack([torch.linalg.matrix_norm(D[i].T @ X[i]) ** 2 for i in range(B)])


@dataclass
class PageResult:
    """Per-module PAGE scores on a probe set."""

    candidates: list[Candidate]
    S: dict[str, float]
    """mean per-sample squared Frobenius norm of the weight gradient"""
    per_sample: list[list[float]]
    """per sample (in probe-set order), per candidate (in `candidates` order): ||G_i||^2"""
    alpha: float
    rank: int
    n_samples: int
    encode_report: EncodeReport | None = None
    seconds: float = 0.0
    methods: dict[str, str] = field(default_factory=dict)
    """which formula each module used (direct or ghost)"""

    @property
    def page(self) -> dict[str, float]:
        return {c.name: page_closed_form(self.S[c.name], alpha=self.alpha, rank=self.rank, d_in=c.d_in)
                for c in self.candidates}

    def with_lora(self, *, alpha: float, rank: int) -> PageResult:
        """The same gradients scored for another LoRA shape (PAGE is closed-form in alpha, r)."""
        check_lora_shape(alpha, rank)
        return PageResult(self.candidates, self.S, self.per_sample, alpha, rank, self.n_samples,
                          self.encode_report, self.seconds, self.methods)


def excluded_positions(exclude, idx: Sequence[int], batch: dict):
    """Bool (B, T) mask of the positions `exclude` names (a list of positions or a callable)."""
    import torch

    ids = batch["input_ids"]
    if callable(exclude):
        out = torch.as_tensor(exclude(list(idx), batch), dtype=torch.bool, device=ids.device)
        if out.shape != ids.shape:
            raise ConfigError(f"exclude_positions returned shape {tuple(out.shape)}, expected {tuple(ids.shape)}")
        return out
    pos = [int(p) for p in exclude]
    if any(p < 0 for p in pos):
        raise ConfigError(f"exclude_positions must be >= 0 (0 is the first token), got {pos}")
    out = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    out[:, [p for p in pos if p < ids.shape[1]]] = True
    return out


GRAM_BLOCK = 64
"""rows per block of the block-triangular Gram products (a symmetric Gram needs only its lower half)"""


def _row_blocks(T: int) -> list[tuple[int, int]]:
    k = max(1, min(4, T // GRAM_BLOCK))
    b = -(-T // k)
    return [(i, min(i + b, T)) for i in range(0, T, b)]


def _bmm_acc(a, b, acc):
    """a @ b in the accumulation dtype `acc`. Half-precision CUDA inputs go to the tensor cores as they are,
    with a float32 result (their values are exact in float32, so this is the float32 product, ~10x faster);
    anything else is cast to `acc` first."""
    import torch

    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32:
        try:
            return torch.bmm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError):  # pragma: no cover - a torch without bmm(out_dtype=)
            pass
    return torch.bmm(a.to(acc), b.to(acc))


def _gram_rows(M, blocks, acc=None):
    """Block rows of the lower triangle of M M^T: [M_i M_{<=i}^T] for each row block i (in dtype `acc`)."""
    acc = acc or M.dtype
    return [_bmm_acc(M[:, i:j], M[:, :j].transpose(1, 2), acc) for i, j in blocks]


def _reduce_input(X, keep, *, method: str, d_in: int, d_out_group: int) -> dict:
    """Keep what the per-sample norms need from one module input X (B, T, d_in).

    ghost keeps only the lower block rows of X X^T (masked: padding / excluded rows -> 0;
    diagonal blocks halved, since each off-diagonal block stands for itself and its mirror),
    so X itself can be freed after the forward pass; direct keeps the masked X.
    """
    import torch

    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    T = X.shape[1]
    m = method if method != "auto" else _cheaper(T, d_in, d_out_group)
    if m == "direct":
        return {"method": m, "X": X.to(acc) * keep.to(acc).reshape(X.shape[0], T, 1)}
    keep = keep.to(acc).reshape(X.shape[0], T)
    blocks = _row_blocks(T)
    rows = _gram_rows(X, blocks, acc)
    masked = not bool(keep.all())
    for r, (i, j) in zip(rows, blocks):
        if masked:
            r.mul_(keep[:, i:j, None] * keep[:, None, :j])
        r[:, :, i:j].mul_(0.5)
    return {"method": m, "XX": rows, "blocks": blocks}


def _sq_norms_from(entry: dict, D):
    """Per-sample ||D_i^T X_i||_F^2 from a `_reduce_input` entry and the output gradients D (B, T, d_out)."""
    import torch

    if entry["method"] == "ghost":
        # sum_ts (X X^T)_ts (D D^T)_ts over the lower block triangle, each block row multiplied in place
        total = None
        for xr, dr in zip(entry["XX"], _gram_rows(D, entry["blocks"], entry["XX"][0].dtype)):
            part = dr.mul_(xr).sum(dim=(1, 2))
            total = part if total is None else total + part
        return 2 * total
    X = entry["X"]
    D = D.to(X.dtype)
    return torch.stack([torch.linalg.matrix_norm(D[i].T @ X[i]) ** 2 for i in range(D.shape[0])])


class PageCollector:
    """PAGE's hooks: per candidate, a forward hook reduces the input X (shared within an input
    group) and a tensor hook on the output turns the gradient D into per-sample ||D_i^T X_i||^2."""

    needs_backward = True

    def __init__(self, candidates: Sequence[Candidate], n_samples: int, *, method: str = "auto",
                 exclude_positions: Sequence[int] | Callable | None = None):
        if method not in ("auto", "direct", "ghost"):
            raise ConfigError(f"method must be auto, direct or ghost, got {method!r}")
        self.candidates = list(candidates)
        self.n = n_samples
        self.method = method
        self.exclude = exclude_positions
        self.methods: dict[str, str] = {}
        self.state: dict = {}
        self.per_sample = None

    def attach(self, ctx) -> list:
        import torch

        cands = self.candidates
        twice = [c.name for c in cands if ctx.calls.get(c.name, 0) > 1]
        if twice:
            raise ConfigError(f"modules run more than once per forward pass (shared weights): {twice[:3]}; "
                              "PAGE's per-sample norms need one call per module; fix: pass `candidates` "
                              "without them")
        # per-sample norms accumulate where the model runs (no device sync per module); float64 but on MPS
        acc_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
        self.acc_device = acc_device
        self.per_sample = torch.zeros((self.n, len(cands)), dtype=torch.float64, device=acc_device)
        members: dict[int, list[int]] = {}
        for j, c in enumerate(cands):
            members.setdefault(ctx.group[c.name], []).append(j)
        return [ctx.modules[c.name].register_forward_hook(self._hook(j, c, ctx.group[c.name], members))
                for j, c in enumerate(cands)]

    def _hook(self, j: int, cand: Candidate, group: int, members: dict[int, list[int]]):
        import torch

        d_out_group = sum(self.candidates[k].d_out for k in members[group])
        n_members = len(members[group])
        state, per_sample, methods = self.state, self.per_sample, self.methods

        def fwd(_mod, inputs, output):
            if not output.requires_grad:
                return
            # the first module of a group that reads one input (q/k/v, gate/up) reduces X for all of them
            entry = state["groups"].get(group)
            if entry is None:
                entry = _reduce_input(inputs[0].detach(), state["mask"], method=self.method, d_in=cand.d_in,
                                      d_out_group=d_out_group)
                entry["left"] = n_members
                state["groups"][group] = entry
            methods[cand.name] = entry["method"]
            idx = state["idx"]

            def on_grad(D):
                norms = _sq_norms_from(entry, D.detach())
                per_sample[idx, j] += norms.to(per_sample.device, torch.float64)
                entry["left"] -= 1
                if entry["left"] <= 0:  # the last reader of this input: free X / X X^T now
                    entry.pop("X", None)
                    entry.pop("XX", None)
            output.register_hook(on_grad)
        return fwd

    def start_batch(self, idx: list[int], batch: dict) -> None:
        import torch

        self.state["idx"] = torch.tensor(idx, device=self.acc_device)
        self.state["groups"] = {}
        keep = batch["attention_mask"]
        if self.exclude is not None:
            keep = keep * ~excluded_positions(self.exclude, idx, batch)
        self.state["mask"] = keep.unsqueeze(-1)

    def end_batch(self) -> None:
        self.state["groups"] = {}

    def result(self, *, alpha: float, rank: int, seconds: float) -> PageResult:
        per_sample = self.per_sample.cpu()
        S = per_sample.mean(0)
        return PageResult(candidates=self.candidates, S={c.name: float(S[j]) for j, c in enumerate(self.candidates)},
                          per_sample=per_sample.tolist(), alpha=float(alpha), rank=int(rank), n_samples=self.n,
                          seconds=seconds, methods=dict(self.methods))


def page_probe(model, encoded: Sequence[Encoded], *, alpha: float = 16.0, rank: int = 8,
               batch_size: int = 1, candidates: Sequence[Candidate] | None = None,
               method: str = "auto", show_progress: bool = False,
               exclude_positions: Sequence[int] | Callable | None = None) -> PageResult:
    """Score every candidate module by PAGE on the pretrained model (step 0).

    `probes.step0.step0_probe` computes the same numbers in the pass that also yields NFN and the
    activation statistics.

    Args:
        model: a causal LM; its parameters are left frozen and untouched.
        encoded: tokenised probe samples (see `samples.encode_samples`).
        alpha, rank: the LoRA shape PAGE is computed for (only a scale per d_in).
        batch_size: samples per forward/backward; results do not depend on it, memory does
            (`probes.budget.plan_batch_size` picks one from a memory budget).
        candidates: modules to score (default: all of `find_candidates(model)`).
        method: `auto`, `direct` or `ghost` for every module.
        exclude_positions: token positions whose module inputs are left out of every G_i
            (e.g. `[0]`, the first / sink token), or `fn(sample_indices, batch) -> bool (B, T)`
            marking them per sample. The forward pass and the output gradients D are unchanged;
            only X's rows at those positions are zeroed, so S measures what flows through the rest.

    Raises:
        ConfigError: alpha/rank <= 0, an empty probe set, an unknown method, modules not in the
            model or run more than once per forward pass.
    """
    check_lora_shape(alpha, rank)
    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample with an assistant turn")
    cands = list(candidates) if candidates is not None else find_candidates(model)
    col = PageCollector(cands, len(encoded), method=method, exclude_positions=exclude_positions)
    stats = run_pass(model, encoded, [col], batch_size=batch_size, show_progress=show_progress, desc="PAGE probe")
    return col.result(alpha=alpha, rank=rank, seconds=stats.seconds)

"""NoRM (Jiang et al., ICLR 2025, "Fine-tuning with Reserved Majority for Noise Reduction").

Train a plain LoRA adapter, then, before using it, keep only the "majority" part of each update
and reload it at the magnitude the reference reloads it with. This module follows the reference
implementation, github.com/pixas/NoRM: `evaluation/auto_select.py` (functions `lora_convert`, the
`--select_method lora` default, and `svd_compress`, run by `scripts/autoselect.sh` with
`step=0.1 range_start=1`) and `model/builder.py` (`load_automerge_model`, which loads the result).

What the reference does, for a trained pair A (r x d_in), B (d_out x r) on a base weight W:

* Candidates (`lora_convert`): fractions `[step * i for i in range(range_start, 10)] + [1]`, each
  keeping c = max(1, int(t * r)) directions; for r = 64, step 0.1, range_start 1:
  6, 12, 19, 25, 32, 38, 44, 51, 57, 64. At t = 1 the trained pair itself is the candidate.
* Truncation (`svd_compress`): of the *unscaled* product B @ A (the LoRA scaling alpha / r is
  never applied), by a one-pass randomised SVD with exactly c Gaussian test vectors (no
  oversampling, no power iteration): Q = orth(B A Omega), Omega ~ N(0, 1) of shape d_in x c;
  U_hat S V^T = svd(Q^T B A); the new pair is A' = V^T (c x d_in), B' = Q U_hat S (d_out x c).
  Their product is Q Q^T B A, the projection of B A onto a c-dimensional subspace of its column
  space drawn with a bias toward the leading singular directions (not exactly the top-c SVD).
* Similarity (`lora_convert`): "phi = ||nu_r^T u_r||_F^2 / r", where u_r are the top-r left
  singular vectors of the base weight W (`torch.svd`) and nu_r the top-r left singular vectors of
  the candidate's product B' A' (`torch.svd` of the d_out x d_in matrix), both cut to r columns
  (fewer when min(d_out, d_in) < r), and r is the trained rank, also for c < r.
* Selection (`lora_convert`): candidates in increasing c, "if phi > sim" -- the argmax of phi,
  ties going to the first (smallest) c. No threshold.
* Storage and magnitude: the kept pairs are written as a state dict; `load_automerge_model`
  groups modules by kept rank and loads each group with a copy of the trained LoraConfig in which
  `r = rank` and `lora_alpha = rank` ("a non-trivial trial from empirical results"), so the
  scaling at inference is 1 and the model runs with W + Q Q^T B A. With the usual alpha = 2r
  (the reference trains with lora_alpha = 2 * lora_r) the kept update has HALF the magnitude it
  had in training, and a module that keeps every direction (t = 1) runs with exactly half its
  trained update. We reproduce this: the reduced adapter has lora_alpha = kept rank (scaling 1)
  and stores the unscaled truncation; `NormChoice.scale` records the factor (r / alpha).

One point needs a reading. For c < r the truncation has rank c, so r - c of the columns of nu_r
belong to zero singular values: in exact arithmetic they are any orthonormal vectors orthogonal to
the truncation's column space; in the reference they are whatever LAPACK returns from the float32
round-off of B' A'. They count in phi, and they decide the outcome: the kept directions' part of phi
is largest at c = r (every candidate's column space lies inside that of B A), so the reference keeps
c < r exactly when these null-space vectors overlap u_r more than the discarded update directions
do -- when the discarded directions are less aligned with the base's top-r subspace than random
directions are. We draw the null-space vectors as a uniformly random orthonormal basis of the
complement of the candidate's column space (the round-off vectors behave so: their mean overlap
with u_r matches that of random ones), instead of one full d_out x d_in SVD per candidate.
Both random draws (Omega and the null-space vectors) come from a per-module generator seeded by
`seed` and the module name, so a reduction is a pure function of the trained adapter.

Deliberate differences, none of which changes the rule: the truncation and the similarity are
computed in float64 (the reference: float32); candidates that give the same c are tried once
(for r >= 10 and step 0.1 there are none); fractions t >= 1 other than the final t = 1 are
dropped (the reference pads such a candidate with null directions: the same update at a larger
stored rank); singular values below NULL_TOL of the largest count as zero; an update that is
exactly zero (a module that never trained) keeps the smallest candidate, which is what the
reference's tie rule gives for it.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field

from domlora.errors import ConfigError
from domlora.modules import PEFT_PREFIX, base_name

logger = logging.getLogger(__name__)

TIE_TOL = 1e-9
"""a candidate must beat the best phi so far by more than this (the reference's strict `>`)"""
NULL_TOL = 1e-6
"""singular values below this fraction of the update's largest count as zero (the reference forms
the truncated product in float32, whose round-off is ~1e-7 of it)"""
SEED = 0
"""default seed of the reduction's random draws"""


@dataclass(frozen=True)
class NormChoice:
    """What Sim-Search kept for one module."""

    rank: int
    """the trained rank r"""
    kept: int
    """the rank c kept"""
    ratio: float
    """the fraction t that gave c"""
    d_in: int
    """the module's input features"""
    d_out: int
    """the module's output features"""
    scale: float
    """reloaded update / trained update on the kept directions: r / alpha (the reference reloads
    the unscaled truncation with lora_alpha = c, scaling 1); 0.5 at alpha = 2r"""
    energy: float
    """||kept B'A'||_F^2 / ||B A||_F^2: the share of the (unscaled) update the truncation keeps"""
    similarity: dict[int, float] = field(default_factory=dict)
    """kept rank c -> phi(c)"""
    A: object = None
    """the new lora_A (c x d_in): V^T of the truncation"""
    B: object = None
    """the new lora_B (d_out x c): U S of the truncation"""

    @property
    def params(self) -> int:
        """trainable parameters of the reduced pair: c * (d_in + d_out)"""
        return self.kept * (self.d_in + self.d_out)

    def summary(self) -> dict:
        return {"rank": self.rank, "kept": self.kept, "ratio": round(self.ratio, 4), "params": self.params,
                "params_before": self.rank * (self.d_in + self.d_out), "scale": round(self.scale, 6),
                "energy": round(self.energy, 6),
                "similarity": {str(k): round(v, 6) for k, v in self.similarity.items()}}


def candidate_ranks(rank: int, *, step: float = 0.1, range_start: int = 1) -> list[tuple[float, int]]:
    """(fraction, kept rank) pairs Sim-Search tries, in the reference's order (`lora_convert`)."""
    if not 0 < step <= 1:
        raise ConfigError(f"norm step must be in (0, 1], got {step}; fix: set norm_step to e.g. 0.1")
    if range_start < 0:
        raise ConfigError(f"norm range_start must be >= 0, got {range_start}; fix: set norm_range_start to e.g. 1")
    ratios = [step * i for i in range(range_start, 10) if step * i < 1] + [1.0]
    out: dict[int, float] = {}
    for t in ratios:
        c = rank if t == 1.0 else max(1, int(t * rank))
        out.setdefault(c, t)
    return sorted(((t, c) for c, t in out.items()), key=lambda x: x[1])


def update_svd(A, B, scaling: float = 1.0):
    """Exact SVD of s * B @ A through two thin QRs (cost O((d_in + d_out) r^2)): U, S, Vh."""
    import torch

    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    qb, rb = torch.linalg.qr(B)          # d_out x r, r x r
    qa, ra = torch.linalg.qr(A.T)        # d_in x r, r x r
    core = scaling * (rb @ ra.T)         # r x r
    u, s, vh = torch.linalg.svd(core)
    return qb @ u, s, vh @ qa.T


def base_subspace(W, k: int):
    """Top-k left singular vectors of a base weight (d_out x d_in), as the reference takes them
    (`torch.svd` of W in float32), returned in float64."""
    import torch

    u, _, _ = torch.linalg.svd(W.detach().to(torch.float32), full_matrices=False)
    return u[:, :k].to(torch.float64)


def randomized_truncation(A, B, c: int, generator):
    """The reference's `svd_compress`: rank-c randomised SVD of the unscaled B @ A (c above
    min(d_out, d_in) gives min(c, d_out, d_in) directions).

    Omega (d_in x c) is drawn from `generator` (CPU, float64); returns (A', B', U, S), float64,
    with A' = V^T (c x d_in), U = Q U_hat (d_out x c, orthonormal), B' = U S, B' A' = Q Q^T B A.
    """
    import torch

    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    omega = torch.randn(A.shape[1], c, generator=generator, dtype=torch.float64).to(A.device)
    q, _ = torch.linalg.qr(B @ (A @ omega))              # d_out x c
    u_hat, s, vh = torch.linalg.svd((q.T @ B) @ A, full_matrices=False)
    u = q @ u_hat
    return vh, u * s, u, s


def null_completion(U, d_out: int, n: int, generator):
    """n orthonormal vectors drawn uniformly from the complement of span(U) (d_out x n, float64)."""
    import torch

    g = torch.randn(d_out, n, generator=generator, dtype=torch.float64).to(U.device)
    for _ in range(2):  # project twice: orthogonal to U to round-off
        g = g - U @ (U.T @ g)
    q, _ = torch.linalg.qr(g)
    return q


def subspace_similarity(U, Uw, r: int, generator) -> float:
    """The reference's phi for a candidate whose column space has the orthonormal basis U (d_out x rho).

    phi = (||U^T Uw||_F^2 + ||N^T Uw||_F^2) / r, where N completes U to k = Uw's column count
    (min(r, d_out, d_in)) with null-space vectors drawn from `generator` (module docstring).
    """
    k, d_out, rho = Uw.shape[1], Uw.shape[0], U.shape[1]
    n = k - rho
    if n <= 0:
        return float((U.T @ Uw).pow(2).sum()) / r
    if n >= d_out - rho:  # the completion fills the whole complement: U and N together span everything
        return float(Uw.pow(2).sum()) / r
    N = null_completion(U, d_out, n, generator)
    return float((U.T @ Uw).pow(2).sum() + (N.T @ Uw).pow(2).sum()) / r


def module_generator(seed: int, name: str):
    """The per-module generator of the reduction's draws: seeded by `seed` and the module name."""
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def sim_search(A, B, W, *, scaling: float, step: float = 0.1, range_start: int = 1,
               generator=None) -> NormChoice:
    """Choose how much of a trained LoRA update to keep, as the reference does (module docstring).

    Args:
        A: lora_A (r x d_in); B: lora_B (d_out x r); W: the base weight (d_out x d_in).
        scaling: the trained LoRA scaling s (alpha / r); only recorded (`scale` = 1 / s): the
            truncation is of the unscaled B @ A, reloaded with scaling 1.
        generator: a CPU `torch.Generator` for the random draws (default: seeded by SEED).
    """
    import torch

    if generator is None:
        generator = torch.Generator().manual_seed(SEED)
    r, d_in = A.shape
    d_out = B.shape[0]
    U_full, S_full, _ = update_svd(A, B)
    total = float(S_full.pow(2).sum())
    smax = float(S_full.max()) if S_full.numel() else 0.0
    k = min(r, d_out, d_in)
    Uw = base_subspace(W, k).to(U_full.device)
    cands = candidate_ranks(r, step=step, range_start=range_start)
    sims: dict[int, float] = {}
    if smax == 0.0:  # never trained: every phi is equal in the reference; its tie rule keeps the first
        t, c = cands[0]
        logger.warning("NoRM: the update is zero; keeping rank %d", c)
        zero_a, zero_b = A.new_zeros(c, d_in), B.new_zeros(d_out, c)
        return NormChoice(rank=r, kept=c, ratio=t, d_in=d_in, d_out=d_out, scale=1.0 / scaling,
                          energy=0.0, similarity={}, A=zero_a, B=zero_b)
    best = None
    for t, c in cands:
        if c >= r:
            newA, newB, S = A.detach().to(torch.float64), B.detach().to(torch.float64), S_full
            U = U_full[:, S_full > NULL_TOL * smax]
        else:
            newA, newB, U, S = randomized_truncation(A, B, c, generator)
            U = U[:, S > NULL_TOL * smax]
        phi = subspace_similarity(U, Uw, r, generator)
        sims[c] = phi
        if best is None or phi > best[0] + TIE_TOL:  # strict: ties go to the smaller c
            best = (phi, t, c, newA, newB, float(S.pow(2).sum()))
    _, t, _, newA, newB, kept_energy = best
    # a candidate c above min(d_out, d_in) yields that many directions (as in the reference, whose
    # stored rank is the truncation's shape)
    return NormChoice(rank=r, kept=int(newA.shape[0]), ratio=t, d_in=d_in, d_out=d_out, scale=1.0 / scaling,
                      energy=kept_energy / total, similarity=sims,
                      A=newA.to(A.dtype).contiguous(), B=newB.to(B.dtype).contiguous())


def reduce_model(model, *, step: float = 0.1, range_start: int = 1, seed: int = SEED) -> dict[str, NormChoice]:
    """Run Sim-Search on every LoRA layer of a `PeftModel` (default adapter); nothing is modified."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, NormChoice] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in getattr(mod, "lora_A", {}):
            continue
        if mod.use_dora.get("default", False):
            raise ConfigError("NoRM reduces plain LoRA updates; this adapter is DoRA; fix: train with variant norm")
        A = mod.lora_A["default"].weight
        B = mod.lora_B["default"].weight
        W = mod.get_base_layer().weight
        if getattr(mod, "fan_in_fan_out", False):
            W = W.T
        short = base_name(name)
        out[short] = c = sim_search(A, B, W, scaling=float(mod.scaling["default"]), step=step,
                                    range_start=range_start, generator=module_generator(seed, short))
        logger.info("NoRM %s: keep rank %d of %d (phi=%.4f, energy %.3f, scale %.3g)", short, c.kept, c.rank,
                    c.similarity.get(c.kept, float("nan")), c.energy, c.scale)
    if not out:
        raise ConfigError("NoRM found no LoRA layers to reduce; fix: train with variant norm (a LoRA adapter)")
    return out


def params_after(reduced: dict[str, NormChoice]) -> int:
    """Trainable parameters of the reduced adapter: sum of kept rank x (d_in + d_out)."""
    return sum(c.params for c in reduced.values())


def reduced_config(model, reduced: dict[str, NormChoice]):
    """The LoRA config of the reduced adapter: per-module rank c and lora_alpha = c (scaling 1),
    as the reference's `load_automerge_model` sets them."""
    import copy

    cfg = copy.deepcopy(model.peft_config["default"])
    ranks = {n: c.kept for n, c in reduced.items()}
    cfg.r = max(ranks.values())
    cfg.lora_alpha = cfg.r
    # PEFT matches pattern keys as `(.*\.)?(key)$`: escaped full names pick out exactly one module
    cfg.rank_pattern = {_re_escape(n): k for n, k in ranks.items()}
    cfg.alpha_pattern = {_re_escape(n): k for n, k in ranks.items()}
    cfg.use_rslora = False
    cfg.inference_mode = True
    return cfg


def _re_escape(name: str) -> str:
    import re

    return re.escape(name)


def save_reduced(model, reduced: dict[str, NormChoice], out_dir: str | os.PathLike) -> None:
    """Write the reduced adapter as a PEFT LoRA folder (`PeftModel.from_pretrained` loads it)."""
    from safetensors.torch import save_file

    cfg = reduced_config(model, reduced)
    cfg.save_pretrained(str(out_dir))
    tensors = {}
    for n, c in reduced.items():
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = c.A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = c.B.detach().cpu().contiguous()
    save_file(tensors, os.path.join(str(out_dir), "adapter_model.safetensors"), metadata={"format": "pt"})

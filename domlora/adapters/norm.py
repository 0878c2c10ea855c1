"""NoRM (Jiang et al., ICLR 2025, "Fine-tuning with Reserved Majority for Noise Reduction").

Train a plain LoRA adapter, then, before using it, keep only the "majority" part of each
update. For a trained pair with update dW = s * B A (rank r, s the LoRA scaling):

1. SVD of the update, dW = U S V^T (exact here; the reference code uses a randomised SVD,
   which approximates the same factors).
2. Sim-Search: for each candidate fraction t in {step*i : i = range_start..9} and t = 1,
   keep c = max(1, int(t * r)) singular triplets and score the kept subspace against the
   base weight W (U_W: its top-r left singular vectors) with the normalised subspace
   similarity of Hu et al. (2022), phi(c) = ||U_c^T U_W||_F^2 / min(c, r).
3. Keep the c with the highest phi (ties: the larger c) and write the adapter back as a rank-c
   LoRA pair, B' = U_c sqrt(S_c), A' = sqrt(S_c) V_c^T, with lora_alpha = c (scaling 1).

Reading of the reference implementation (github.com/pixas/NoRM, `evaluation/auto_select.py`,
method `lora`): it scores the top-r left singular vectors of the rank-c truncation against the
base's top-r and divides by r; for c < r, r - c of those vectors span the truncation's null
space and are arbitrary, so we score only the c meaningful directions and divide by c (the
min(i, j) normalisation of the subspace-similarity measure of the LoRA paper, Hu et al. 2022).
Defaults follow the reference script: step 0.1, range_start 1.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from domlora.errors import ConfigError
from domlora.modules import PEFT_PREFIX, base_name

logger = logging.getLogger(__name__)

TIE_TOL = 1e-4
"""similarities this close count as equal (then the larger kept rank wins)"""


@dataclass
class NormChoice:
    """What Sim-Search kept for one module."""

    rank: int
    """the trained rank r"""
    kept: int
    """the rank c kept"""
    ratio: float
    """the fraction t that gave c"""
    similarity: dict[int, float] = field(default_factory=dict)
    """kept rank c -> phi(c)"""
    A: object = None
    """the new A (c x d_in), already carrying sqrt(S)"""
    B: object = None
    """the new B (d_out x c)"""

    def summary(self) -> dict:
        return {"rank": self.rank, "kept": self.kept, "ratio": round(self.ratio, 4),
                "similarity": {str(k): round(v, 6) for k, v in self.similarity.items()}}


def candidate_ranks(rank: int, *, step: float = 0.1, range_start: int = 1) -> list[tuple[float, int]]:
    """(fraction, kept rank) pairs Sim-Search tries, as the reference script builds them."""
    if not 0 < step <= 1:
        raise ConfigError(f"norm step must be in (0, 1], got {step}")
    if range_start < 0:
        raise ConfigError(f"norm range_start must be >= 0, got {range_start}")
    ratios = [step * i for i in range(range_start, 10) if 0 < step * i < 1] + [1.0]
    out: dict[int, float] = {}
    for t in ratios:
        c = max(1, int(t * rank))
        out.setdefault(c, t)
    return sorted(((t, c) for c, t in out.items()), key=lambda x: x[1])


def update_svd(A, B, scaling: float):
    """Exact SVD of s * B @ A through two thin QRs (cost O((d_in + d_out) r^2)): U, S, Vh."""
    import torch

    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64)
    qb, rb = torch.linalg.qr(B)          # d_out x r, r x r
    qa, ra = torch.linalg.qr(A.T)        # d_in x r, r x r
    core = scaling * (rb @ ra.T)         # r x r
    u, s, vh = torch.linalg.svd(core)
    return qb @ u, s, vh @ qa.T


def base_subspace(W, r: int):
    """Top-r left singular vectors of a base weight (d_out x d_in)."""
    import torch

    u, _, _ = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    return u[:, :r]


def subspace_similarity(Ua, Ub) -> float:
    """||Ua^T Ub||_F^2 / min(cols): 1 when one subspace contains the other, ~0 when orthogonal."""
    k = min(Ua.shape[1], Ub.shape[1])
    return float((Ua.T @ Ub).pow(2).sum() / k)


def sim_search(A, B, W, *, scaling: float, step: float = 0.1, range_start: int = 1) -> NormChoice:
    """Choose how much of a trained LoRA update to keep (see module docstring).

    Args:
        A: lora_A (r x d_in); B: lora_B (d_out x r); W: the base weight (d_out x d_in).
        scaling: the LoRA scaling s (alpha / r, or alpha / sqrt(r) for rsLoRA).
    """
    r = A.shape[0]
    U, S, Vh = update_svd(A, B, scaling)
    Uw = base_subspace(W, min(r, min(W.shape)))
    sims: dict[int, float] = {}
    best_c, best_t, best = None, None, -1.0
    for t, c in candidate_ranks(r, step=step, range_start=range_start):
        phi = subspace_similarity(U[:, :c], Uw)
        sims[c] = phi
        if phi >= best - TIE_TOL:  # ties (up to round-off) go to the larger kept rank
            best_c, best_t, best = c, t, max(phi, best)
    root = S[:best_c].clamp_min(0).sqrt()
    dtype = A.dtype
    newB = (U[:, :best_c] * root).to(dtype).contiguous()
    newA = (root[:, None] * Vh[:best_c]).to(dtype).contiguous()
    return NormChoice(rank=r, kept=best_c, ratio=best_t, similarity=sims, A=newA, B=newB)


def reduce_model(model, *, step: float = 0.1, range_start: int = 1) -> dict[str, NormChoice]:
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
        out[short] = sim_search(A, B, W, scaling=float(mod.scaling["default"]), step=step, range_start=range_start)
        logger.info("NoRM %s: keep rank %d of %d (phi=%.4f)", short, out[short].kept, out[short].rank,
                    out[short].similarity[out[short].kept])
    if not out:
        raise ConfigError("NoRM found no LoRA layers to reduce; fix: train with variant norm (a LoRA adapter)")
    return out


def reduced_config(model, reduced: dict[str, NormChoice]):
    """The LoRA config of the reduced adapter: per-module rank and alpha (scaling 1)."""
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

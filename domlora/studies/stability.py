"""Task stability of PAGE: do probe sets of different tasks pick the same module on one backbone?

`compare_probes` (`probes.agreement`, which the report reads too) compares `page.json` documents of one
backbone pairwise: agreement of the overall argmax and of the `dom` module (largest-PAGE `down_proj`),
Spearman correlation of the module PAGE vectors, and top-k overlap. `bootstrap_choice` resamples the probe samples of one
run (from `PageResult.per_sample`, no re-probing) and reports how often `dom` and the argmax
stay what the full probe set picks.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from domlora.errors import ConfigError
from domlora.probes.agreement import PairComparison, StabilityReport, compare_probes, spearman  # noqa: F401
from domlora.probes.page import PageResult


@dataclass
class BootstrapResult:
    """How often each module wins when the probe samples are resampled with replacement."""

    n_boot: int
    n_samples: int
    dom: str | None
    """`dom` on the full probe set"""
    argmax: str
    """argmax on the full probe set"""
    dom_stability: float
    """fraction of resamples whose `dom` equals `dom`"""
    argmax_stability: float
    dom_counts: dict[str, int] = field(default_factory=dict)
    argmax_counts: dict[str, int] = field(default_factory=dict)
    dom_share_ci: tuple[float, float] = (math.nan, math.nan)
    """95% interval of `dom`'s share of all down_proj PAGE"""

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_choice(result: PageResult, *, n_boot: int = 1000, seed: int = 0) -> BootstrapResult:
    """Bootstrap stability of `dom` and the argmax over the probe samples (no re-probing).

    Args:
        result: a `PageResult` (its `per_sample` norms are resampled).
        n_boot: number of resamples.
        seed: RNG seed.

    Raises:
        ConfigError: n_boot < 1 or a result without per-sample norms.
    """
    import numpy as np

    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    per = np.asarray(result.per_sample, dtype=np.float64)
    if per.ndim != 2 or per.shape[0] == 0 or per.shape[1] != len(result.candidates):
        raise ConfigError("the PAGE result has no per-sample norms to resample; fix: pass the PageResult "
                          "returned by page_probe (not a summary)")
    names = [c.name for c in result.candidates]
    # PAGE = alpha^2 S / (3 r d_in): the ranking only needs S / d_in
    scale = 1.0 / np.array([c.d_in for c in result.candidates], dtype=np.float64)
    down = np.array([c.type == "down_proj" for c in result.candidates])
    rng = np.random.default_rng(seed)
    n = per.shape[0]

    def picks(S):
        score = S * scale
        a = int(np.argmax(score))
        if not down.any():
            return a, None, math.nan
        ds = np.where(down, score, -np.inf)
        d = int(np.argmax(ds))
        return a, d, float(score[d] / score[down].sum())

    a0, d0, _ = picks(per.mean(0))
    dom_counts: Counter = Counter()
    arg_counts: Counter = Counter()
    shares = []
    for _ in range(n_boot):
        S = per[rng.integers(0, n, n)].mean(0)
        a, d, share = picks(S)
        arg_counts[names[a]] += 1
        if d is not None:
            dom_counts[names[d]] += 1
            shares.append(share)
    dom0 = names[d0] if d0 is not None else None
    ci = (float(np.quantile(shares, 0.025)), float(np.quantile(shares, 0.975))) if shares else (math.nan, math.nan)
    return BootstrapResult(n_boot=n_boot, n_samples=n, dom=dom0, argmax=names[a0],
                           dom_stability=dom_counts[dom0] / n_boot if dom0 else math.nan,
                           argmax_stability=arg_counts[names[a0]] / n_boot,
                           dom_counts=dict(dom_counts.most_common()), argmax_counts=dict(arg_counts.most_common()),
                           dom_share_ci=ci)

"""Do probe sets of different tasks agree on one backbone? `compare_probes` compares `page.json` documents
pairwise: the overall argmax, the `dom` module (largest-PAGE `down_proj`), Spearman correlation of the module
PAGE vectors, and top-k overlap (the report's task-stability table; `domlora stability` prints it).
`bootstrap_choice` resamples one probe's samples: how often dom and the argmax stay what the whole set picks
(the probe stage writes it into page.json)."""
from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from domlora.errors import ConfigError


@dataclass
class PairComparison:
    """Two probe sets on one backbone."""

    a: str
    b: str
    argmax_agree: bool
    dom_agree: bool
    spearman: float
    """rank correlation of the two module PAGE vectors"""
    spearman_down_proj: float
    """the same over the `down_proj` modules only"""
    topk_overlap: float
    """|top-k(a) & top-k(b)| / k"""
    argmax: tuple[str, str]
    dom: tuple[str | None, str | None]


@dataclass
class StabilityReport:
    k: int
    labels: list[str]
    pairs: list[PairComparison]
    dom: dict[str, str | None]
    argmax: dict[str, str]

    @property
    def dom_agreement(self) -> float:
        return sum(p.dom_agree for p in self.pairs) / len(self.pairs)

    @property
    def argmax_agreement(self) -> float:
        return sum(p.argmax_agree for p in self.pairs) / len(self.pairs)

    def to_dict(self) -> dict:
        return {"k": self.k, "labels": self.labels, "dom": self.dom, "argmax": self.argmax,
                "dom_agreement": self.dom_agreement, "argmax_agreement": self.argmax_agreement,
                "all_dom_agree": len(set(self.dom.values())) == 1,
                "all_argmax_agree": len(set(self.argmax.values())) == 1,
                "mean_spearman": sum(p.spearman for p in self.pairs) / len(self.pairs),
                "pairs": [asdict(p) for p in self.pairs]}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(x) != len(y):
        raise ConfigError(f"spearman needs vectors of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _modules(doc: Mapping, label: str) -> dict[str, dict]:
    mods = doc.get("modules") if isinstance(doc, Mapping) else None
    if not isinstance(mods, dict) or not mods or not all("PAGE" in m for m in mods.values()):
        raise ConfigError(f"probe {label!r} has no module PAGE table; fix: pass page.json files written by "
                          "`domlora probe`")
    return mods


def _dom(mods: dict[str, dict]) -> str | None:
    downs = [n for n, m in mods.items() if m["type"] == "down_proj"]
    return max(downs, key=lambda n: mods[n]["PAGE"]) if downs else None


def compare_probes(docs: Mapping[str, Mapping], *, k: int = 5) -> StabilityReport:
    """Compare the PAGE results of several probe sets on one backbone.

    Args:
        docs: label (e.g. the task) -> `page.json` dict; at least two.
        k: size of the top-k lists compared.

    Raises:
        ConfigError: fewer than two probes, k < 1, or probes whose module sets differ (other backbones).
    """
    if len(docs) < 2:
        raise ConfigError(f"task stability needs at least two probe results, got {len(docs)}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    tables = {label: _modules(doc, label) for label, doc in docs.items()}
    labels = list(tables)
    ref = set(tables[labels[0]])
    for label in labels[1:]:
        if set(tables[label]) != ref:
            diff = sorted(ref ^ set(tables[label]))[:3]
            raise ConfigError(f"probes {labels[0]!r} and {label!r} score different modules (e.g. {diff}): they "
                              "come from different architectures; fix: compare probes of one backbone")
    names = sorted(ref)
    downs = [n for n in names if tables[labels[0]][n]["type"] == "down_proj"]
    kk = min(k, len(names))
    dom = {lb: _dom(t) for lb, t in tables.items()}
    argmax = {lb: max(t, key=lambda n: t[n]["PAGE"]) for lb, t in tables.items()}
    top = {lb: set(sorted(t, key=lambda n: -t[n]["PAGE"])[:kk]) for lb, t in tables.items()}
    pairs = []
    for a, b in itertools.combinations(labels, 2):
        ta, tb = tables[a], tables[b]
        pairs.append(PairComparison(
            a=a, b=b, argmax_agree=argmax[a] == argmax[b], dom_agree=dom[a] == dom[b],
            spearman=spearman([ta[n]["PAGE"] for n in names], [tb[n]["PAGE"] for n in names]),
            spearman_down_proj=spearman([ta[n]["PAGE"] for n in downs], [tb[n]["PAGE"] for n in downs]),
            topk_overlap=len(top[a] & top[b]) / kk, argmax=(argmax[a], argmax[b]), dom=(dom[a], dom[b])))
    return StabilityReport(k=kk, labels=labels, pairs=pairs, dom=dom, argmax=argmax)


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


def bootstrap_choice(result, *, n_boot: int = 1000, seed: int = 0) -> BootstrapResult:
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

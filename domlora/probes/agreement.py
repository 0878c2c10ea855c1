"""Do probe sets of different tasks agree on one backbone? `compare_probes` compares `page.json` documents
pairwise: the overall argmax, the `dom` module (largest-PAGE `down_proj`), Spearman correlation of the module
PAGE vectors, and top-k overlap (the report's task-stability table; `domlora stability` prints it)."""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

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

"""Placement strategies: which modules get an adapter, as exact names plus the evidence.

Pure functions over probe results (`page.json` / `nfn.json` dicts, and the documents of the
placement peers, `domlora.peers`); no torch needed. Every strategy returns fully-qualified
module names, which PEFT's `target_modules` matches exactly (no suffix surprises).

PAGE at any budget: `page_budget` takes modules in PAGE order at one rank until a parameter budget is
spent; `page_rank` spreads a total rank over modules in proportion to their PAGE and writes PEFT's
`rank_pattern` / `alpha_pattern` (alpha / r kept at the recipe's ratio), so the adapter loads with plain
PEFT. A budget is given in parameters (`budget`) or as a fraction of vanilla LoRA's at the same rank
(`budget_fraction`), never both.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from domlora.errors import ConfigError
from domlora.modules import ATTN_TYPES, FFN_TYPES, TYPES
from domlora.probes.massive_choice import choose_from_doc

# group names usable wherever a list of types is taken
TYPE_GROUPS = {"ffn_all": FFN_TYPES, "attn_all": ATTN_TYPES, "all": TYPES}


@dataclass(frozen=True)
class PlacementSpec:
    """What a strategy needs besides probe results."""

    strategy: str
    k: int = 3
    """modules for page_topk / random, types for plop / plop_inverse"""
    types: tuple[str, ...] = ()
    """types (or groups ffn_all / attn_all) for `types` and `explicit`"""
    layers: tuple[int, ...] = ()
    """layers for `explicit` (negative counts from the end: -1 is the last)"""
    seed: int = 0
    """for `random`"""
    rank: int = 64
    """LoRA rank of `page_budget`'s modules, of `page_rank`'s base ratio, and of the vanilla LoRA a
    `budget_fraction` is a fraction of"""
    alpha: float | None = None
    """LoRA alpha at `rank` (default 2 x rank); `page_rank` keeps alpha / r at this ratio per module"""
    budget: float | None = None
    """trainable LoRA parameters to spend (`page_budget`, `page_rank`)"""
    budget_fraction: float | None = None
    """the budget as a fraction of vanilla LoRA's parameters (every projection at `rank`)"""
    total_rank: int | None = None
    """`page_rank`: the total rank spread over its modules (instead of a parameter budget)"""
    max_modules: int | None = None
    """`page_rank`: spread over the top this-many modules by PAGE (None: every candidate)"""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(sorted(STRATEGIES))}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        check_budget_spec(self)


@dataclass
class Placement:
    """Where adapters go."""

    strategy: str
    modules: list[str]
    """fully-qualified module names"""
    evidence: dict = field(default_factory=dict)
    model: str | None = None
    rank_pattern: dict[str, int] | None = None
    """PEFT `rank_pattern` (module name -> rank) when modules differ in rank (`page_rank`)"""
    alpha_pattern: dict[str, float] | None = None
    """PEFT `alpha_pattern`, beside `rank_pattern`"""
    modules_by_seed: dict[str, list[str]] | None = None
    """a seeded draw (`random`) per training seed: the cell of seed s trains `modules_by_seed[str(s)]`"""

    def to_dict(self) -> dict:
        d = asdict(self) | {"n_modules": len(self.modules)}
        return {k: v for k, v in d.items() if v is not None or k not in _OPTIONAL}

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        if "modules" not in d or not isinstance(d["modules"], list) or not d["modules"]:
            raise ConfigError("a placement needs a non-empty `modules` list of module names")
        return cls(strategy=d.get("strategy", "explicit"), modules=list(d["modules"]),
                   evidence=d.get("evidence", {}), model=d.get("model"), rank_pattern=d.get("rank_pattern"),
                   alpha_pattern=d.get("alpha_pattern"), modules_by_seed=d.get("modules_by_seed"))

    def for_seed(self, seed: int) -> Placement:
        """The placement a training run of `seed` uses (a seeded draw's own modules for that seed)."""
        if not self.modules_by_seed:
            return self
        if str(seed) in self.modules_by_seed:
            names = list(self.modules_by_seed[str(seed)])
        elif isinstance(self.evidence.get("draw_from"), list) and self.evidence.get("k"):
            names = _draw(self.evidence["draw_from"], self.evidence["k"], seed)  # a seed added to the grid later
        else:
            raise ConfigError(f"this {self.strategy} placement was drawn for seeds {', '.join(self.modules_by_seed)}, "
                              f"not {seed}; fix: rerun the select stage for the seeds the method trains")
        keep = (lambda pattern: {n: v for n, v in pattern.items() if n in names} or None) if names else None
        return Placement(strategy=self.strategy, modules=names, evidence={"seed": seed, "k": len(names)},
                         model=self.model, rank_pattern=keep(self.rank_pattern or {}),
                         alpha_pattern=keep(self.alpha_pattern or {}))

    def lora_kwargs(self) -> dict:
        """The PEFT `LoraConfig` keywords beside `target_modules` (per-module ranks and alphas, if any)."""
        return {k: dict(v) for k, v in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern))
                if v}


_OPTIONAL = ("rank_pattern", "alpha_pattern", "modules_by_seed")


def _expand_types(types: Sequence[str], present: set[str]) -> list[str]:
    out: list[str] = []
    for t in types:
        if t in TYPE_GROUPS:
            out += [x for x in TYPE_GROUPS[t] if x in present]
        elif t in TYPES:
            out.append(t)
        else:
            raise ConfigError(f"unknown module type {t!r}; valid: {', '.join(TYPES + tuple(TYPE_GROUPS))}")
    return list(dict.fromkeys(out))


def _modules_table(probe: dict) -> dict[str, dict]:
    mods = probe.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise ConfigError("the probe file has no `modules`; fix: pass a page.json written by `domlora probe`")
    return mods


def _ranked(mods: dict[str, dict], key: str, names=None) -> list[str]:
    names = list(mods) if names is None else names
    return sorted(names, key=lambda n: -mods[n][key])


def _need_page(probe: dict | None) -> dict[str, dict]:
    if probe is None:
        raise ConfigError("this strategy needs PAGE scores; fix: pass --probe DIR/page.json")
    return _modules_table(probe)


def _evidence_for(mods, names, key="PAGE"):
    rank = {n: i + 1 for i, n in enumerate(_ranked(mods, key))} if all(key in m for m in mods.values()) else {}
    return {n: {k: mods[n][k] for k in ("type", "layer", "S", "PAGE", "share_total", "share_type") if k in mods[n]}
            | ({"rank": rank[n]} if n in rank else {}) for n in names}


def dominant_module(mods: dict[str, dict]) -> str:
    """The paper's rule: the `down_proj` with the largest PAGE."""
    downs = [n for n, m in mods.items() if m["type"] == "down_proj"]
    if not downs:
        raise ConfigError("no `down_proj` modules in the probe results, so the `dom` rule does not apply; "
                          "fix: use `page_argmax` or `page_topk` for this architecture")
    return _ranked(mods, "PAGE", downs)[0]


def _dom(spec, probe, nfn, mods):
    mods = _need_page(probe)
    dom = dominant_module(mods)
    argmax = _ranked(mods, "PAGE")[0]
    return [dom], {"modules": _evidence_for(mods, [dom]), "argmax": argmax, "argmax_differs": argmax != dom}


def _page_argmax(spec, probe, nfn, mods):
    mods = _need_page(probe)
    top = _ranked(mods, "PAGE")[0]
    dom = dominant_module(mods) if any(m["type"] == "down_proj" for m in mods.values()) else None
    return [top], {"modules": _evidence_for(mods, [top]), "dom": dom, "differs_from_dom": top != dom}


def _page_topk(spec, probe, nfn, mods):
    mods = _need_page(probe)
    if spec.k > len(mods):
        raise ConfigError(f"k={spec.k} is larger than the {len(mods)} candidate modules; fix: k <= {len(mods)}")
    top = _ranked(mods, "PAGE")[: spec.k]
    return top, {"modules": _evidence_for(mods, top), "k": spec.k}


def _all(spec, probe, nfn, mods):
    return list(mods), {"rule": "every candidate projection (vanilla LoRA)"}


def _plop(spec, probe, nfn, mods, *, inverse=False):
    if nfn is None or "type_scores" not in nfn:
        if probe is not None and "signals" in probe and "nfn" not in probe["signals"]:
            raise ConfigError("plop needs NFN scores, but this probe ran without them (`domlora probe --no-nfn`, "
                              "or `nfn: false` in the probe params); fix: rerun `domlora probe` without --no-nfn, "
                              "or pass --nfn FILE from a probe of the same model that has them")
        raise ConfigError("plop needs NFN scores (nfn.json, which `domlora probe` writes unless --no-nfn); fix: pass "
                          "--nfn DIR/nfn.json, or rerun `domlora probe` without --no-nfn")
    ts = nfn["type_scores"]
    if spec.k > len(ts):
        raise ConfigError(f"k={spec.k} is larger than the {len(ts)} module types; fix: k <= {len(ts)}")
    chosen = sorted(ts, key=lambda t: ts[t], reverse=inverse)[: spec.k]
    names = [n for n, m in mods.items() if m["type"] in chosen]
    return names, {"types": chosen, "type_scores": ts, "rule": "highest NFN" if inverse else "lowest NFN"}


def _types(spec, probe, nfn, mods):
    if not spec.types:
        raise ConfigError("strategy `types` needs --types (e.g. down_proj or ffn_all)")
    types = _expand_types(spec.types, {m["type"] for m in mods.values()})
    names = [n for n, m in mods.items() if m["type"] in types]
    if not names:
        raise ConfigError(f"no modules of types {types} in this model")
    return names, {"types": types}


def _explicit(spec, probe, nfn, mods):
    if not spec.types or not spec.layers:
        raise ConfigError("strategy `explicit` needs --layers and --types (e.g. --layers 1 --types down_proj)")
    n_layers = max(m["layer"] for m in mods.values()) + 1
    layers = []
    for layer in spec.layers:
        real = layer + n_layers if layer < 0 else layer
        if not 0 <= real < n_layers:
            raise ConfigError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
        layers.append(real)
    types = _expand_types(spec.types, {m["type"] for m in mods.values()})
    names = [n for n, m in mods.items() if m["type"] in types and m["layer"] in layers]
    if not names:
        raise ConfigError(f"no modules of types {types} in layers {layers}")
    ev = {"layers": layers, "types": types}
    if probe is not None and all("PAGE" in m for m in mods.values()):
        ev["modules"] = _evidence_for(mods, names)
    return names, ev


def _random(spec, probe, nfn, mods):
    if spec.k > len(mods):
        raise ConfigError(f"k={spec.k} is larger than the {len(mods)} candidate modules; fix: k <= {len(mods)}")
    return _draw(list(mods), spec.k, spec.seed), {"seed": spec.seed, "k": spec.k}


def _draw(names: list[str], k: int, seed: int) -> list[str]:
    """k of `names` drawn with `seed`, in the table's order."""
    import random  # note: a module-level `import random as _random` would be shadowed by `_random`

    return sorted(random.Random(seed).sample(sorted(names), k), key=list(names).index)


# ---------------------------------------------------------------- PAGE at any budget

BUDGET_STRATEGIES = {"page_budget", "page_rank"}


def check_budget_spec(spec: PlacementSpec) -> None:
    """The checks a budget needs before any table or model: one unit, positive, only where it is read."""
    given = [k for k in ("budget", "budget_fraction", "total_rank") if getattr(spec, k) is not None]
    if spec.strategy not in BUDGET_STRATEGIES:
        if given:
            raise ConfigError(f"strategy {spec.strategy!r} takes no budget (got {', '.join(given)}); fix: use "
                              "page_budget or page_rank, or drop it")
        return
    if spec.rank < 1:
        raise ConfigError(f"rank must be >= 1, got {spec.rank}")
    if spec.alpha is not None and not spec.alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {spec.alpha}")
    if spec.budget is not None and spec.budget_fraction is not None:
        raise ConfigError(f"the budget is given both in parameters ({spec.budget:g}) and as a fraction of vanilla "
                          f"LoRA's ({spec.budget_fraction:g}); fix: give one of them")
    if spec.total_rank is not None and (spec.budget is not None or spec.budget_fraction is not None):
        raise ConfigError("page_rank got a total rank and a parameter budget; fix: give one of them")
    if spec.total_rank is not None and spec.strategy != "page_rank":
        raise ConfigError("a total rank is page_rank's budget; fix: give page_budget a budget in parameters or a "
                          "budget fraction")
    if spec.max_modules is not None and spec.strategy != "page_rank":
        raise ConfigError("max_modules applies to page_rank; page_budget takes modules until its budget is spent")
    if not given:
        what = "a budget in parameters (budget) or a fraction of vanilla LoRA's (budget_fraction)" + (
            ", or a total rank (total_rank)" if spec.strategy == "page_rank" else "")
        raise ConfigError(f"strategy {spec.strategy} needs {what}; fix: e.g. budget=3e6 or budget_fraction=0.16")
    if spec.budget is not None and not spec.budget >= 1:
        raise ConfigError(f"budget must be a number of parameters >= 1, got {spec.budget!r}")
    if spec.budget_fraction is not None and not 0 < spec.budget_fraction <= 1:
        raise ConfigError(f"budget_fraction is a share of vanilla LoRA's parameters, in (0, 1], got "
                          f"{spec.budget_fraction!r}; fix: e.g. 0.16, or budget=N for a count in parameters")
    if spec.max_modules is not None and spec.max_modules < 1:
        raise ConfigError(f"max_modules must be >= 1, got {spec.max_modules}")
    if spec.total_rank is not None:
        if spec.total_rank < 1:
            raise ConfigError(f"total_rank must be >= 1, got {spec.total_rank}")
        if spec.max_modules is not None and spec.total_rank < spec.max_modules:
            raise ConfigError(f"page_rank's total rank {spec.total_rank} is below its {spec.max_modules} modules, and "
                              f"every module needs rank >= 1; fix: total_rank >= {spec.max_modules}, or fewer modules "
                              f"(max_modules <= {spec.total_rank})")


def lora_params(table: dict[str, dict], names, rank: int = 64, rank_pattern: dict | None = None) -> int:
    """Trainable LoRA parameters of `names` at `rank` (or each module's rank in `rank_pattern`): r (d_in + d_out)."""
    pattern = rank_pattern or {}
    return int(sum(int(pattern.get(n, rank)) * (table[n]["d_in"] + table[n]["d_out"]) for n in names))


def _shape_table(mods: dict[str, dict]) -> None:
    bad = [n for n, m in mods.items() if "d_in" not in m or "d_out" not in m]
    if bad:
        raise ConfigError(f"the module table has no shapes (d_in, d_out) for {bad[0]}; fix: pass a page.json written "
                          "by `domlora probe`")


def _budget_of(spec: PlacementSpec, mods: dict[str, dict]) -> tuple[float, dict]:
    """The budget in parameters, and how it was given; refuses one the model's projections cannot hold."""
    _shape_table(mods)
    vanilla = lora_params(mods, mods, spec.rank)
    budget = spec.budget if spec.budget is not None else spec.budget_fraction * vanilla
    weights = sum(m["d_in"] * m["d_out"] for m in mods.values())
    if budget > weights:
        raise ConfigError(f"a budget of {budget:,.0f} parameters is larger than the model's projections "
                          f"({len(mods)} modules, {weights:,} weights in all); fix: a budget below that, e.g. "
                          f"budget_fraction <= 1 (vanilla LoRA at rank {spec.rank}: {vanilla:,})")
    how = {"budget_params": budget, "vanilla_lora_params": vanilla, "vanilla_lora_rank": spec.rank}
    if spec.budget_fraction is not None:
        how["budget_fraction"] = spec.budget_fraction
    return budget, how


def _page_budget(spec, probe, nfn, mods):
    mods = _need_page(probe)
    budget, how = _budget_of(spec, mods)
    if spec.budget_fraction is None and budget > how["vanilla_lora_params"]:
        raise ConfigError(f"a budget of {budget:,.0f} parameters is more than every projection at rank {spec.rank} "
                          f"({how['vanilla_lora_params']:,}: vanilla LoRA); fix: strategy `all`, a higher rank, or "
                          f"a budget <= {how['vanilla_lora_params']:,}")
    ranked = _ranked(mods, "PAGE")
    chosen, spent = [], 0
    for n in ranked:  # a prefix of the PAGE order: the next module would overspend, so the budget is spent
        cost = spec.rank * (mods[n]["d_in"] + mods[n]["d_out"])
        if spent + cost > budget:
            break
        chosen.append(n)
        spent += cost
    if not chosen:
        first = ranked[0]
        cost = spec.rank * (mods[first]["d_in"] + mods[first]["d_out"])
        raise ConfigError(f"a budget of {budget:,.0f} parameters is smaller than one module at rank {spec.rank} (the "
                          f"top PAGE module {first} costs {cost:,}); fix: budget >= {cost:,}, or a lower rank "
                          f"(rank {max(1, int(budget // (mods[first]['d_in'] + mods[first]['d_out'])))} fits)")
    return chosen, how | {"rank": spec.rank, "lora_params": spent, "spent_share": spent / budget,
                          "modules": _evidence_for(mods, chosen)}


def allocate_ranks(weights: dict[str, float], total: int, caps: dict[str, int] | None = None) -> dict[str, int]:
    """Integer ranks summing to `total`, each >= 1 and <= its cap, in proportion to `weights` (largest remainder).

    Modules whose proportional share falls below 1 (or above the cap) are pinned there, and the rest is
    shared again among the others.
    """
    names = list(weights)
    caps = caps or {}
    if total < len(names):
        raise ConfigError(f"a total rank of {total} is below the {len(names)} modules, each of which needs rank >= 1")
    if caps and total > sum(caps.get(n, 10 ** 9) for n in names):
        raise ConfigError(f"a total rank of {total} is more than the modules can hold ({sum(caps.values())})")
    pinned: dict[str, int] = {}
    free = list(names)
    share: dict[str, float] = {}
    while free:
        left = total - sum(pinned.values())
        w = sum(max(weights[n], 0.0) for n in free)
        share = {n: (left * max(weights[n], 0.0) / w if w > 0 else left / len(free)) for n in free}
        high = [n for n in free if share[n] > caps.get(n, 10 ** 9)]
        # caps first (they only hand rank back to the others), then the floor of 1
        pin = {n: caps[n] for n in high} if high else {n: 1 for n in free if share[n] < 1}
        if not pin:
            break
        pinned |= pin
        free = [n for n in free if n not in pin]
    ranks = dict(pinned) | {n: int(share[n]) for n in free}
    rest = total - sum(ranks.values())
    # the remainder by largest fractional share, then (everything pinned) by weight, never past a cap
    order = sorted(free, key=lambda n: (-(share[n] - int(share[n])), names.index(n)))
    order += sorted((n for n in names if n not in free), key=lambda n: (-weights[n], names.index(n)))
    while rest > 0:
        grew = False
        for n in order:
            if rest <= 0:
                break
            if ranks[n] < caps.get(n, 10 ** 9):
                ranks[n] += 1
                rest -= 1
                grew = True
        if not grew:
            break
    return {n: ranks[n] for n in names}


def _page_rank(spec, probe, nfn, mods):
    mods = _need_page(probe)
    _shape_table(mods)
    ranked = _ranked(mods, "PAGE")
    if spec.max_modules is not None:
        if spec.max_modules > len(ranked):
            raise ConfigError(f"max_modules={spec.max_modules} is larger than the {len(ranked)} candidate modules; "
                              f"fix: max_modules <= {len(ranked)}")
        ranked = ranked[: spec.max_modules]
    names = sorted(ranked, key=list(mods).index)
    pages = {n: float(mods[n]["PAGE"]) for n in names}
    caps = {n: min(mods[n]["d_in"], mods[n]["d_out"]) for n in names}  # a rank above min(d_in, d_out) adds nothing
    how: dict = {}
    if spec.total_rank is not None:
        if spec.total_rank < len(names):
            raise ConfigError(f"page_rank's total rank {spec.total_rank} is below its {len(names)} modules, and every "
                              f"module needs rank >= 1; fix: total_rank >= {len(names)}, or fewer modules "
                              f"(max_modules <= {spec.total_rank})")
        if spec.total_rank > sum(caps.values()):
            raise ConfigError(f"a total rank of {spec.total_rank} is more than the {len(names)} modules can hold "
                              f"(sum of min(d_in, d_out): {sum(caps.values())}); fix: total_rank <= {sum(caps.values())}")
        total = spec.total_rank
    else:
        budget, how = _budget_of(spec, mods)
        floor = lora_params(mods, names, 1)
        if budget < floor:
            raise ConfigError(f"a budget of {budget:,.0f} parameters is smaller than one rank per module for page_rank's "
                              f"{len(names)} modules ({floor:,}); fix: budget >= {floor:,}, or fewer modules "
                              f"(max_modules)")
        ceiling = sum(caps[n] * (mods[n]["d_in"] + mods[n]["d_out"]) for n in names)
        if budget > ceiling:
            raise ConfigError(f"a budget of {budget:,.0f} parameters is more than page_rank's {len(names)} modules can "
                              f"hold at full rank ({ceiling:,}); fix: budget <= {ceiling:,}")
        # the largest total rank whose allocation fits the budget (the cost grows with the total)
        lo, hi = len(names), sum(caps.values())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if lora_params(mods, names, rank_pattern=allocate_ranks(pages, mid, caps)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        total = lo
    ranks = allocate_ranks(pages, total, caps)
    ratio = (spec.alpha if spec.alpha is not None else 2.0 * spec.rank) / spec.rank
    alphas = {n: ratio * r for n, r in ranks.items()}
    spent = lora_params(mods, names, rank_pattern=ranks)
    ev = how | {"total_rank": total, "alpha_over_rank": ratio, "lora_params": spent,
                "modules": _evidence_for(mods, names)}
    if "budget_params" in how:
        ev["spent_share"] = spent / how["budget_params"]
    return names, ev, ranks, alphas


def _peer(name: str):
    def choose(spec, probe, nfn, mods, peer=None):
        if peer is None:
            raise ConfigError(f"strategy `{name}` reads the model; fix: pass its peer document "
                              f"(`domlora.peers.run_peer({name!r}, model)`), or run `domlora select --model M`")
        if not isinstance(peer, dict) or peer.get("kind") != "peer" or peer.get("peer") != name:
            raise ConfigError(f"strategy `{name}` got a document that is not {name}'s peer document "
                              f"(kind {peer.get('kind') if isinstance(peer, dict) else type(peer).__name__!r}, "
                              f"peer {peer.get('peer') if isinstance(peer, dict) else None!r})")
        unknown = [n for n in peer["chosen"] if n not in mods]
        if unknown:
            raise ConfigError(f"{name} chose {unknown[0]}, which is not a module of this model's table (the peer ran "
                              f"on {peer.get('model')!r}); fix: run the peer and the probe on the same model")
        return list(peer["chosen"]), dict(peer.get("evidence") or {}) | {"options": peer.get("options", {})}
    return choose


STRATEGIES: dict[str, Callable] = {
    "dom": _dom,
    "page_argmax": _page_argmax,
    "page_topk": _page_topk,
    "all": _all,
    "plop": _plop,
    "plop_inverse": lambda *a: _plop(*a, inverse=True),
    "types": _types,
    "explicit": _explicit,
    "random": _random,
    "page_budget": _page_budget,
    "page_rank": _page_rank,
    "massive": lambda spec, probe, nfn, mods, activations=None: _massive(probe, mods, activations),
    "kappa": _peer("kappa"),
    "aletheia": _peer("aletheia"),
    "eva": _peer("eva"),
}


def _massive(probe, mods, activations):
    return choose_from_doc(activations, mods, probe)


# strategies that read the forward-only `massive.json` (passed to select() as `activations`)
ACTIVATION_STRATEGIES = {"massive"}
# strategies that read a placement peer's document (`domlora.peers`, passed to select() as `peer`)
PEER_STRATEGIES = {"kappa", "aletheia", "eva"}
# strategies whose input the select stage computes from the model itself when no document is given
MODEL_STRATEGIES = PEER_STRATEGIES | ACTIVATION_STRATEGIES


def select(spec: PlacementSpec, *, probe: dict | None = None, nfn: dict | None = None,
           modules: dict[str, dict] | None = None, activations: dict | None = None,
           peer: dict | None = None) -> Placement:
    """Apply a strategy to probe results.

    Args:
        spec: the strategy and its arguments.
        probe: a `page.json` dict (needed by dom / page_*; gives the module table).
        nfn: an `nfn.json` dict (needed by plop / plop_inverse).
        activations: a `massive.json` dict written by `domlora diagnose` (needed by `massive`).
        peer: a peer document from `domlora.peers.run_peer` (needed by kappa / aletheia / eva).
        modules: the module table `{name: {"type", "layer", "d_in", "d_out"}}` when no probe is given.
    """
    table = modules if modules is not None else (probe or nfn or activations or peer or {}).get("modules")
    if not table:
        raise ConfigError("no module table: pass a probe result (page.json) or the model's candidates")
    patterns: list = []
    if spec.strategy in ACTIVATION_STRATEGIES:
        names, evidence = STRATEGIES[spec.strategy](spec, probe, nfn, table, activations=activations)
    elif spec.strategy in PEER_STRATEGIES:
        names, evidence = STRATEGIES[spec.strategy](spec, probe, nfn, table, peer=peer)
    else:
        names, evidence, *patterns = STRATEGIES[spec.strategy](spec, probe, nfn, table)
    model = (probe or nfn or activations or peer or {}).get("model")
    ranks, alphas = patterns if patterns else (None, None)
    return Placement(strategy=spec.strategy, modules=list(names), evidence=evidence, model=model,
                     rank_pattern=ranks, alpha_pattern=alphas)


def draw_per_seed(spec: PlacementSpec, seeds, *, modules: dict[str, dict], model: str | None = None) -> Placement:
    """A `random` placement drawn once per training seed (`modules`: seed 0's draw, or the first seed's)."""
    if spec.strategy != "random":
        raise ConfigError(f"only `random` draws per seed, not {spec.strategy!r}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("draw_per_seed needs at least one seed")
    draws = {str(s): select(replace(spec, seed=s), modules=modules).modules for s in seeds}
    first = draws[str(0 if 0 in seeds else seeds[0])]
    return Placement(strategy="random", modules=list(first), model=model, modules_by_seed=draws,
                     evidence={"k": spec.k, "seeds": seeds, "rule": "k modules drawn with each training seed",
                               "draw_from": list(modules)})

"""Placement strategies: which modules get an adapter, as exact names plus the evidence.

Pure functions over probe results (`page.json` / `nfn.json` dicts, and the documents of the
placement peers, `domlora.peers`); no torch needed. Every strategy returns fully-qualified
module names, which PEFT's `target_modules` matches exactly (no suffix surprises).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

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

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(sorted(STRATEGIES))}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


@dataclass
class Placement:
    """Where adapters go."""

    strategy: str
    modules: list[str]
    """fully-qualified module names"""
    evidence: dict = field(default_factory=dict)
    model: str | None = None

    def to_dict(self) -> dict:
        return asdict(self) | {"n_modules": len(self.modules)}

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        if "modules" not in d or not isinstance(d["modules"], list) or not d["modules"]:
            raise ConfigError("a placement needs a non-empty `modules` list of module names")
        return cls(strategy=d.get("strategy", "explicit"), modules=list(d["modules"]),
                   evidence=d.get("evidence", {}), model=d.get("model"))


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
    import random  # note: a module-level `import random as _random` would be shadowed by this function

    names = sorted(random.Random(spec.seed).sample(sorted(mods), spec.k), key=list(mods).index)
    return names, {"seed": spec.seed, "k": spec.k}


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
    if spec.strategy in ACTIVATION_STRATEGIES:
        names, evidence = STRATEGIES[spec.strategy](spec, probe, nfn, table, activations=activations)
    elif spec.strategy in PEER_STRATEGIES:
        names, evidence = STRATEGIES[spec.strategy](spec, probe, nfn, table, peer=peer)
    else:
        names, evidence = STRATEGIES[spec.strategy](spec, probe, nfn, table)
    model = (probe or nfn or activations or peer or {}).get("model")
    return Placement(strategy=spec.strategy, modules=list(names), evidence=evidence, model=model)

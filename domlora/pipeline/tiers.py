"""Equal-budget tiers: a placement's trainable parameters, counted from the module table, against its tier's.

A tier (a budget class of `tune.budgets`) may name a `reference` method whose parameter count is the tier's
on each model (vanilla LoRA at r=1, one down_proj at r=64, ...). The select stage counts every placement it
writes (rank x (d_in + d_out) per module, or d_in x d_out for a full update) from the probe's module table
and refuses one more than `TIER_TOLERANCE` away from the reference, before anything trains; the tune stage
checks the whole tier once its sweep runs report what they trained.

    python -c "from domlora.pipeline.tiers import tier_counts; ..."   # exact counts per tier, from the config
"""
from __future__ import annotations

from domlora.errors import ConfigError
from domlora.io import read_json, write_json
from domlora.placement import BUDGET_STRATEGIES, MODEL_STRATEGIES, PlacementSpec, lora_params, select

TIER_TOLERANCE = 0.15
"""the methods of a tier differ in trainable parameters by at most this share (largest / smallest - 1)"""


def method_budget(params, method: str) -> dict | None:
    """The budget keys of a `page_budget` / `page_rank` method for `PlacementSpec` (None for other strategies)."""
    m = params.methods[method]
    if m.placement not in BUDGET_STRATEGIES:
        return None
    cfg = params.train_config(method)
    return {"budget": m.budget_params, "budget_fraction": m.budget_fraction, "total_rank": m.total_rank,
            "max_modules": m.max_modules, "rank": cfg.rank, "alpha": cfg.alpha}


def draw_seeds(params, method: str) -> list[int]:
    """The seeds a seeded draw (`random`) is made for: the tuning seed and every training seed of the method."""
    seeds = params.method_seeds(method)
    return list(dict.fromkeys(([params.tune.seed] if params.tune is not None else []) + seeds))


def placement_params(doc: dict, table: dict[str, dict], *, rank: int, variant: str = "lora") -> int:
    """Trainable parameters of a placement document on a module table (what training will count, no bias)."""
    missing = [n for n in doc["modules"] if n not in table]
    if missing:
        raise ConfigError(f"the placement names {missing[0]}, which the module table lacks; fix: select the placement "
                          "from this model's probe")
    if variant == "full":
        return int(sum(table[n]["d_in"] * table[n]["d_out"] for n in doc["modules"]))
    if doc.get("strategy") == "eva" and "lora_params" in (doc.get("evidence") or {}):
        return int(doc["evidence"]["lora_params"])  # EVA redistributes the rank: its own count
    return lora_params(table, doc["modules"], rank, doc.get("rank_pattern"))


def seed_params(doc: dict, table: dict[str, dict], *, rank: int) -> dict[str, int]:
    """Trainable parameters of each seed's draw of a placement drawn per seed."""
    from domlora.placement import Placement

    pl = Placement.from_dict(doc)
    return {s: lora_params(table, pl.for_seed(int(s)).modules, rank, pl.for_seed(int(s)).rank_pattern)
            for s in (doc.get("modules_by_seed") or {})}


def expected_params(params, model: str, method: str, table: dict[str, dict], probe: dict | None = None) -> int:
    """A method's trainable parameters on a model, from its module table (and PAGE, for PAGE's strategies).

    Raises for the strategies that read the model itself (the peers): they have no count before they run.
    """
    m = params.methods[method]
    if m.placement in MODEL_STRATEGIES:
        raise ConfigError(f"method {method!r} ({m.placement}) chooses its modules from the model itself, so its "
                          "count is known only after its select stage; fix: make a fixed or PAGE placement the "
                          "tier's `reference`")
    cfg = params.train_config(method)
    spec = PlacementSpec(strategy=m.placement, k=m.k, types=tuple(m.types), layers=tuple(m.layers_for(model)),
                         **(method_budget(params, method) or {}))
    pl = select(spec, probe=probe if probe is not None else {"modules": table}, modules=table)
    return placement_params(pl.to_dict(), table, rank=cfg.rank, variant=cfg.variant)


def match_rank(doc: dict, table: dict[str, dict], target: int, *, alpha_over_rank: float) -> dict:
    """The one rank at which a placement's modules hold `target` parameters, as PEFT patterns (capped per module)."""
    names = doc["modules"]
    per_rank = sum(table[n]["d_in"] + table[n]["d_out"] for n in names)
    r = max(1, round(target / per_rank))
    ranks = {n: min(r, table[n]["d_in"], table[n]["d_out"]) for n in names}
    return {"rank_pattern": ranks, "alpha_pattern": {n: alpha_over_rank * x for n, x in ranks.items()},
            "matched": {"rank": r, "target_params": int(target)}}


def tier_spread(counts: dict[str, int]) -> float:
    """largest / smallest - 1 over a tier's counts (0 for one method)."""
    vals = [v for v in counts.values() if v]
    return max(vals) / min(vals) - 1 if vals else 0.0


def check_counts(tier: str, counts: dict[str, int], *, model: str) -> None:
    """Refuse a tier whose methods differ by more than `TIER_TOLERANCE` in trainable parameters."""
    spread = tier_spread(counts)
    if spread > TIER_TOLERANCE + 1e-12:
        lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
        raise ConfigError(f"tier {tier!r} on {model}: its methods differ by {100 * spread:.0f}% in trainable parameters "
                          f"({hi}: {counts[hi]:,}, {lo}: {counts[lo]:,}; at most {100 * TIER_TOLERANCE:.0f}%); fix: "
                          f"change their rank or budget, or move one to the tier of its size")


def check_tier(params, model: str, dataset: str, method: str, doc: dict, *, layout) -> dict:
    """The select stage's check: this placement's count against its tier's reference; records the count.

    Rewrites the placement document with `trainable_params` (and `tier`: the reference and its count).
    """
    m = params.methods[method]
    page_path = layout.page_json(model, params.select_probe(dataset))
    probe = read_json(page_path) if page_path.is_file() else {}
    table = probe.get("modules") or {}
    if not table or any("d_in" not in t or "d_out" not in t for t in table.values()):
        return doc
    cfg = params.train_config(method)
    tier = params.tune.budgets.get(m.budget) if m.budget is not None and params.tune is not None else None
    ref = expected_params(params, model, tier.reference, table, probe) if tier is not None and tier.reference else None
    if m.match_tier and ref is not None:
        matched = match_rank(doc, table, ref, alpha_over_rank=cfg.alpha / cfg.rank)
        for mods in (doc.get("modules_by_seed") or {}).values():  # each seed's draw matched on its own
            more = match_rank({"modules": mods}, table, ref, alpha_over_rank=cfg.alpha / cfg.rank)
            matched["rank_pattern"] |= more["rank_pattern"]
            matched["alpha_pattern"] |= more["alpha_pattern"]
        doc = doc | matched
    doc = doc | {"trainable_params": placement_params(doc, table, rank=cfg.rank, variant=cfg.variant)}
    if ref is not None:
        check_counts(m.budget, {method: doc["trainable_params"], tier.reference: ref}, model=model)
        doc["tier"] = {"name": m.budget, "reference": tier.reference, "reference_params": ref}
    write_json(layout.placement(model, dataset, method), doc)
    return doc

"""Placement peers that read the model: what a user could pick instead of PAGE, run as their authors ship them.

- `kappa`: KappaTune, PEFT's helper (`peft.helpers.find_kappa_target_modules`): the modules whose weight
  matrices have the lowest condition numbers (an SVD of every linear weight; no data).
- `aletheia`: the `aletheia-lora` package: its gradient probe (per-layer sum of parameter-gradient norms,
  full-sequence loss, batches of one) and `select_layers`; every default target module in the chosen layers.
- `eva`: PEFT's EVA (explained variance adaptation): incremental SVD of every projection's inputs on the
  training data, and LoRA's rank budget redistributed over the projections by explained variance.
- `massive`: the forward-only predictor of the dominant `down_proj` (`domlora.probes.massive`).

    doc = run_peer("kappa", loaded, options={"num_modules": 1})
    placement = select(PlacementSpec(strategy="kappa"), peer=doc)

Each returns a peer document: the peer's own scores, its choice as exact module names (only block
projections, the candidates every strategy chooses from), its settings, and what it cost (`cost`: wall
seconds and peak memory above the loaded model). The select stage runs them, so that stage loads the
model for these strategies only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

from domlora.errors import ConfigError
from domlora.adapters.eva import bounded_eva_forward, check_eva, eva_batches, quiet_eva
from domlora.memory import measure_cost
from domlora.modules import find_candidates, num_layers
from domlora.peer_options import (ALETHEIA_EXTRA, ALETHEIA_PIN, DOC_KIND, EVA_TYPES_NOTE, AletheiaOptions, EvaOptions,
                                  KappaOptions, MassiveOptions, parse_options)
from domlora.probes.massive import massive_predict, massive_summary

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- peers


def _model_type(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__)


def _unsupported(peer: str, model, why: str, fix: str) -> ConfigError:
    return ConfigError(f"placement peer {peer} does not support model type {_model_type(model)!r}: {why}; fix: {fix}")


def _table(cands) -> dict[str, dict]:
    return {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out} for c in cands}


def kappa(model, opts: KappaOptions) -> dict:
    """KappaTune: condition numbers of every linear weight, the lowest ones chosen (PEFT's helper)."""
    from peft.helpers import KappaTuneSelector

    cands = find_candidates(model)
    names = {c.name for c in cands}
    if all(c.conv1d for c in cands):
        raise _unsupported("kappa", model, "PEFT's KappaTune helper analyses nn.Linear weights, and this model's "
                           "projections are Conv1D", "use another placement for this architecture")
    # note: `find_kappa_target_modules(model, top_p)` is this selector's `get_best_targets(top_p=top_p)`; building
    # it here keeps the condition numbers for the evidence (the helper returns only the names)
    selector = KappaTuneSelector(model, max_dim_size_to_analyze=opts.max_dim_size_to_analyze, show_progress=False)
    kappas = selector.get_best_targets()  # computes and sorts; the numbers are kept on the selector
    numbers = dict(getattr(selector, "_condition_numbers", None) or {})
    if opts.num_modules is None:
        picked = selector.get_best_targets(top_p=opts.top_p)
        rule = f"the helper's top_p={opts.top_p}: the {len(picked)} of {len(kappas)} analysed linear modules with " \
               "the lowest condition number"
    else:
        ranked = [n for n in kappas if n in names]
        picked = ranked[: opts.num_modules]
        rule = f"the {opts.num_modules} block projection(s) with the lowest condition number"
    chosen = [n for n in picked if n in names]
    outside = [n for n in picked if n not in names]
    if not chosen:
        raise _unsupported("kappa", model, f"the helper chose no block projection (it chose {outside[:3]})",
                           "use another placement for this architecture")
    skipped = sorted(names - set(numbers))
    return {"chosen": chosen, "scores": {n: numbers[n] for n in sorted(numbers, key=numbers.get) if n in names},
            "evidence": {"rule": rule, "condition_numbers": {n: round(numbers[n], 4) for n in chosen},
                         "not_candidates": outside, "not_analysed": skipped, "n_analysed": len(numbers)},
            "modules": _table(cands)}


def _aletheia_module():
    try:
        import aletheia_lora
    except ImportError:
        raise ConfigError(f"placement aletheia needs the package aletheia-lora, which is not installed; fix: pip "
                          f"install -e '.[{ALETHEIA_EXTRA}]' (the `{ALETHEIA_EXTRA}` extra pins {ALETHEIA_PIN})") from None
    return aletheia_lora


def aletheia(model, encoded, opts: AletheiaOptions) -> dict:
    """Aletheia: the package's gradient probe and layer selection, its default target modules in those layers."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    pkg = _aletheia_module()
    cands = find_candidates(model)
    n_layers = num_layers(cands)
    cfg = pkg.aletheia_lora_config(selected_layers=list(range(n_layers)), target_modules=list(opts.target_modules))
    reachable = [c.name for c in cands if check_target_module_exists(cfg, c.name)]
    if not reachable:
        present = sorted({c.name.rsplit(".", 1)[-1] for c in cands})
        raise _unsupported("aletheia", model, f"its target modules {', '.join(opts.target_modules)} are not in this "
                           f"model (its projections: {', '.join(present)})",
                           "pass the model's own projection names as the option target_modules")
    if not encoded:
        raise ConfigError("placement peer aletheia needs probe samples; fix: pass a non-empty probe set")
    if len(encoded) < opts.probe_batches:
        logger.warning("aletheia asked for %d probe batches, the probe set holds %d samples", opts.probe_batches,
                       len(encoded))
    # the package's probe reads a dataset of tokenised rows (batches of one: no padding)
    rows = [{"input_ids": torch.tensor(e.input_ids), "attention_mask": torch.ones(len(e.input_ids), dtype=torch.long)}
            for e in encoded]
    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        scores = pkg.gradient_probe(model=model, dataset=rows, num_layers=n_layers, probe_batches=opts.probe_batches,
                                    chunk_size=opts.chunk_size, seed=opts.seed)
    finally:
        for n, p in model.named_parameters():  # the probe leaves every weight frozen; restore what was there
            p.requires_grad_(grads[n])
            p.grad = None
        model.train(was_training)
    if opts.num_layers is None:
        layers = pkg.select_layers(scores, top_pct=opts.top_pct)
        rule = f"the package's select_layers(top_pct={opts.top_pct:g}): {len(layers)} of {n_layers} layers"
    else:
        if opts.num_layers > n_layers:
            raise ConfigError(f"aletheia option num_layers={opts.num_layers} exceeds the model's {n_layers} layers")
        layers = sorted(sorted(scores, key=lambda i: -scores[i])[: opts.num_layers])
        rule = f"the {opts.num_layers} layer(s) with the largest gradient norm"
    cfg = pkg.aletheia_lora_config(selected_layers=list(layers), target_modules=list(opts.target_modules))
    chosen = [c.name for c in cands if check_target_module_exists(cfg, c.name)]
    return {"chosen": chosen, "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "evidence": {"rule": rule, "layers": list(layers), "target_modules": list(opts.target_modules),
                         "layer_scores": {str(i): round(float(scores[i]), 6) for i in layers},
                         "loss": "the package's: full-sequence next-token loss, prompt included",
                         "n_probe_samples": min(opts.probe_batches, len(encoded))},
            "modules": _table(cands)}


def eva(model, encoded, opts: EvaOptions, *, pad_id: int) -> dict:
    """EVA: PEFT's rank redistribution over every projection from the SVD of their inputs on training data."""
    from peft import EvaConfig, LoraConfig, get_eva_state_dict

    cands = find_candidates(model)
    if not encoded:
        raise ConfigError("placement peer eva needs training samples; fix: pass a non-empty training set")
    cfg = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, target_modules=[c.name for c in cands],
                     init_lora_weights="eva", eva_config=EvaConfig(rho=opts.rho, tau=opts.tau),
                     fan_in_fan_out=any(c.conv1d for c in cands))
    batches = eva_batches(encoded, batch_size=opts.batch_size, pad_id=pad_id, device=next(model.parameters()).device)
    check_eva(batches, rank=opts.rank, rho=opts.rho, min_d_in=min(c.d_in for c in cands))
    with quiet_eva():
        state = get_eva_state_dict(model, batches, peft_config=cfg,
                                   forward_fn=bounded_eva_forward(len(batches), tau=opts.tau),
                                   gather_distributed_inputs=False, show_progress_bar=False)
    ranks = {c.name: int(state[c.name].shape[0]) if c.name in state else 0 for c in cands}
    return {"chosen": [c.name for c in cands], "scores": ranks,
            "evidence": eva_evidence(ranks, _table(cands), rank=opts.rank) | {
                "rho": opts.rho, "tau": opts.tau, "n_samples": len(encoded), "batch_size": opts.batch_size},
            "modules": _table(cands)}


def eva_evidence(ranks: dict[str, int], table: dict[str, dict], *, rank: int) -> dict:
    """What EVA's allocation amounts to: ranks per module and type, modules left without an adapter, parameters."""
    by_type: dict[str, int] = {}
    for n, r in ranks.items():
        by_type[table[n]["type"]] = by_type.get(table[n]["type"], 0) + r
    params = sum(r * (table[n]["d_in"] + table[n]["d_out"]) for n, r in ranks.items())
    return {"rule": f"{EVA_TYPES_NOTE}; budget {rank} x {len(ranks)} = {rank * len(ranks)}",
            "ranks": ranks, "rank_by_type": by_type, "zero_rank": [n for n, r in ranks.items() if r == 0],
            "lora_params": int(params)}


def massive(model, encoded, opts: MassiveOptions, *, model_name: str) -> dict:
    """The forward-only predictor, as a `massive.json` document (the `massive` strategy's input)."""
    pred, report = massive_predict(model, encoded, rule=opts.rule, batch_size=opts.batch_size)
    return massive_summary(pred, report, model=model_name)


def run_peer(peer: str, model, *, options: dict | None = None, encoded: Sequence | None = None,
             model_name: str | None = None, pad_id: int = 0) -> dict:
    """Run one peer on a loaded model (and its data) and return its document with the cost.

    Args:
        peer: `kappa`, `aletheia`, `eva` or `massive`.
        model: a `transformers` causal LM.
        options: the peer's options (`OPTIONS[peer]`), validated here; an unknown one is an error.
        encoded: tokenised samples (`samples.encode_samples`): the probe split for aletheia and massive, the
            first training samples for eva; kappa reads none.
        model_name: what the document names as the model.

    Returns:
        {"kind": "peer", "peer", "model", "model_type", "options", "chosen", "scores", "evidence", "modules",
        "cost": {"wall_s", "peak_rss_mb", "peak_over_model_mb", "memory_kind"}} (massive: its massive.json + cost).
    """
    opts = parse_options(peer, options)
    device = str(next(model.parameters()).device)
    with measure_cost(device) as cost:
        if peer == "kappa":
            doc = kappa(model, opts)
        elif peer == "aletheia":
            doc = aletheia(model, list(encoded or []), opts)
        elif peer == "eva":
            doc = eva(model, list(encoded or []), opts, pad_id=pad_id)
        else:
            doc = massive(model, list(encoded or []), opts, model_name=model_name or _model_type(model))
    if peer == "massive":
        return doc | {"cost": cost, "options": asdict(opts)}
    return {"kind": DOC_KIND, "peer": peer, "model": model_name or _model_type(model), "model_type": _model_type(model),
            "options": asdict(opts), **doc, "cost": cost}

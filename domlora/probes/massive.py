"""Forward-only predictor of the dominant module: the `down_proj` where the massive activation starts.

Massive activations (Sun et al. 2024) are a few hidden-state values, usually on the first
token, thousands of times the median; they appear abruptly after one early block, whose FFN
`down_proj` writes them through a single "super weight" (Yu et al. 2024). The predictor runs
forward passes only (no labels, no backward) and picks that block's `down_proj`:

- `onset` (default): the first block after which most samples hold a massive value;
- `largest_jump`: the block that multiplies the largest |h| of the residual stream the most;
- `largest_output`: the `down_proj` with the largest output.

If no block meets the massive criterion, `onset` falls back to `largest_output` and says so
(`phenomenon: false`). The `massive.json` document written from the result is what the
`massive` placement strategy consumes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from domlora.probes.activations import ActivationReport, MassiveCriterion, activation_diagnostics
from domlora.errors import ConfigError
from domlora.probes.massive_choice import DOC_KIND, choose_from_doc  # noqa: F401 (choose_from_doc: re-exported)
from domlora.samples import Encoded

logger = logging.getLogger(__name__)

Rule = Literal["onset", "largest_jump", "largest_output"]
RULES: tuple[str, ...] = ("onset", "largest_jump", "largest_output")
FORMAT_VERSION = 1


@dataclass
class MassivePrediction:
    """The predicted module and why."""

    module: str
    layer: int
    rule: str
    phenomenon: bool
    """some block meets the massive criterion for most samples"""
    fallback: bool
    """`onset` found no massive block and used `largest_output`"""
    onset_layer: int | None
    alternatives: dict[str, str] = field(default_factory=dict)
    """what every rule picks"""
    evidence: dict = field(default_factory=dict)


def _pick(report: ActivationReport, rule: str) -> tuple[int, bool]:
    downs = {d.layer: d for d in report.down_proj}
    if rule == "onset":
        onset = report.onset_layer
        if onset is not None and onset in downs:
            return onset, False
        return _pick(report, "largest_output")[0], True
    if rule == "largest_jump":
        return max((s for s in report.layers if s.layer in downs), key=lambda s: s.jump).layer, False
    if rule == "largest_output":
        return max(report.down_proj, key=lambda d: d.output_median_max).layer, False
    raise ConfigError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")


def predict_from_report(report: ActivationReport, *, rule: Rule = "onset") -> MassivePrediction:
    """Apply a rule to activation diagnostics already measured."""
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    layer, fallback = _pick(report, rule)
    if fallback:
        logger.warning("no block meets the massive criterion (|h| > %g and >= %gx the median for %d%% of the "
                       "samples); falling back to the down_proj with the largest output (layer %d)",
                       report.criterion.abs_threshold, report.criterion.ratio,
                       round(100 * report.criterion.min_fraction), layer)
    down = report.down_proj_at(layer)
    stats = next(s for s in report.layers if s.layer == layer)
    prev = report.embedding if layer == report.layers[0].layer else next(
        s for s in report.layers if s.layer == layer - 1)
    sw = down.super_weight
    evidence = {
        "residual_max_before": prev.peak.magnitude,
        "residual_max_after": stats.peak.magnitude,
        "jump": stats.jump,
        "ratio_to_median": stats.ratio,
        "massive_fraction": stats.massive_fraction,
        "position": stats.peak.position,
        "first_token_fraction": stats.first_token_fraction,
        "channel": stats.peak.channel,
        "mlp_share_of_jump": stats.mlp_share,
        "down_proj_input_max": down.input_peak.magnitude,
        "down_proj_input_channel": down.input_peak.channel,
        "down_proj_output_max": down.output_peak.magnitude,
        "first_token_input_energy": down.first_token_energy,
    }
    if sw is not None:
        evidence["super_weight"] = {"row": sw.row, "col": sw.col, "weight": sw.weight, "share_of_output": sw.share,
                                    "aligned_with_input_peak": sw.aligned, "weight_z": sw.weight_z}
    alternatives = {r: down_name(report, _pick(report, r)[0]) for r in RULES}
    return MassivePrediction(module=down.name, layer=layer, rule=rule, phenomenon=report.onset_layer is not None,
                             fallback=fallback, onset_layer=report.onset_layer, alternatives=alternatives,
                             evidence=evidence)


def down_name(report: ActivationReport, layer: int) -> str:
    return report.down_proj_at(layer).name


def massive_predict(model, encoded: Sequence[Encoded], *, rule: Rule = "onset", batch_size: int = 8,
                    criterion: MassiveCriterion | None = None,
                    show_progress: bool = False) -> tuple[MassivePrediction, ActivationReport]:
    """Predict the dominant `down_proj` from forward passes alone.

    Args:
        model: a causal LM (left untouched).
        encoded: tokenised samples; only their tokens are used (no loss mask, no labels).
            Massive activations barely depend on the input, so a handful of samples suffice.
        rule: `onset`, `largest_jump` or `largest_output` (see the module docstring).

    Returns:
        The prediction and the activation diagnostics it was read from.

    Raises:
        ConfigError: empty probe set or unknown rule. ModelError: no FFN down projection.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    report = activation_diagnostics(model, encoded, batch_size=batch_size, criterion=criterion,
                                    show_progress=show_progress)
    return predict_from_report(report, rule=rule), report


def massive_summary(pred: MassivePrediction, report: ActivationReport, *, model: str,
                    config_hash: str | None = None) -> dict:
    """The `massive.json` document (what the `massive` placement strategy reads)."""
    return {
        "kind": DOC_KIND,
        "format_version": FORMAT_VERSION,
        "model": model,
        "config_hash": config_hash,
        "rule": pred.rule,
        "predicted": pred.module,
        "layer": pred.layer,
        "phenomenon": pred.phenomenon,
        "fallback": pred.fallback,
        "onset_layer": pred.onset_layer,
        "alternatives": pred.alternatives,
        "evidence": pred.evidence,
        "criterion": report.to_dict()["criterion"],
        "n_samples": report.n_samples,
        "n_tokens": report.n_tokens,
        "seconds": report.seconds,
        "modules": {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out}
                    for c in report.candidates},
    }

"""Diagnostics study: massive activations per layer beside the down_proj PAGE curve, and the
forward-only prediction of the dominant module (`domlora diagnose`).

Run as: domlora diagnose --model embedded --data data/arith/probe.jsonl --out diagnostics/embedded/arith
"""
from __future__ import annotations

import logging
from pathlib import Path

from domlora.errors import ConfigError
from domlora.io import atomic_outputs, read_json, write_json
from domlora.models import config_hash, load_model
from domlora.probes.activations import MassiveCriterion
from domlora.probes.massive import RULES, massive_predict, massive_summary
from domlora.probes.summary import plot_activations
from domlora.samples import encode_samples, read_samples

logger = logging.getLogger(__name__)


def diagnose(*, model: str, data: str | Path, out_dir: str | Path, samples: int = 32, max_length: int = 256,
             batch_size: int = 8, probe_path: str | Path | None = None, rule: str = "onset",
             criterion: MassiveCriterion | None = None, dtype: str = "auto", device: str | None = None,
             cache_dir: str | None = None, trust_remote_code: bool = False, model_name: str | None = None,
             show_progress: bool = False) -> dict:
    """Diagnose stage: write `activations.json`, `massive.json` and `activations.png` into `out_dir`.

    Args:
        model: `embedded`, a hub id or a local folder.
        data: chat JSONL; only the tokens of its first `samples` samples are used (no labels).
        probe_path: a `page.json` of the same model; adds the down_proj PAGE panel to the plot and
            the agreement of the prediction with PAGE's `dom` to `massive.json`.
        rule: the predictor's rule (`onset`, `largest_jump`, `largest_output`).

    Returns:
        The `massive.json` document.
    """
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    page = None
    if probe_path is not None:
        if not Path(probe_path).is_file():
            raise ConfigError(f"probe file {probe_path} does not exist; fix: run `domlora probe` first or drop --probe")
        page = read_json(probe_path)
    chosen = read_samples(data, limit=samples)  # validate before loading the model
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    encoded, _ = encode_samples(loaded.tokenizer, chosen, max_length=max_length)
    pred, report = massive_predict(loaded.model, encoded, rule=rule, batch_size=batch_size, criterion=criterion,
                                   show_progress=show_progress)
    name = model_name or model
    doc = massive_summary(pred, report, model=name, config_hash=config_hash(loaded.model))
    doc["data"] = str(data)
    acts = report.to_dict() | {"model": name, "data": str(data)}
    if page is not None:
        if page.get("modules") and pred.module not in page["modules"]:
            raise ConfigError(f"{probe_path} does not score {pred.module}: it belongs to another model; fix: pass "
                              "the page.json of the same model")
        doc["page_dominant"] = page.get("dominant")
        doc["agrees_with_dom"] = page.get("dominant") == pred.module
        doc["page_argmax"] = page.get("argmax")
    with atomic_outputs(out_dir) as stage:
        write_json(stage / "activations.json", acts)
        write_json(stage / "massive.json", doc)
        plot_activations(acts, stage / "activations.png", page=page, massive=doc,
                         title=f"{name}: massive activations vs down_proj PAGE")
    logger.info("massive activation onset at layer %s; predicted %s (%s)", pred.onset_layer, pred.module, rule)
    return doc

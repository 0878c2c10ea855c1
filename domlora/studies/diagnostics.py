"""Diagnostics study: massive activations per layer beside the down_proj PAGE curve, and the
forward-only prediction of the dominant module (`domlora diagnose`).

Run as: domlora diagnose --model embedded --data data/arith/probe.jsonl --out diagnostics/embedded/arith
"""
from __future__ import annotations

import logging
from pathlib import Path

from domlora.errors import ConfigError
from domlora.probes.activations import MassiveCriterion

logger = logging.getLogger(__name__)


def page_layer_curve(page_doc: dict, module_type: str = "down_proj") -> dict[int, float]:
    """layer -> PAGE of the `module_type` module there, from a `page.json` dict."""
    mods = page_doc.get("modules") or {}
    return {m["layer"]: m["PAGE"] for m in mods.values() if m.get("type") == module_type}


def plot_activations(report: dict, path: str | Path, *, page: dict | None = None, massive: dict | None = None,
                     title: str | None = None) -> Path:
    """Max |activation| per layer (residual stream and down_proj input), beside the down_proj PAGE curve.

    Args:
        report: `ActivationReport.to_dict()` (the `activations.json` dict).
        path: PNG to write (atomically).
        page: a `page.json` dict; adds the lower panel with its `down_proj` PAGE per layer.
        massive: a `massive.json` dict; marks the predicted module.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s["layer"] for s in report["layers"]]
    resid = [s["max"] for s in report["layers"]]
    med = [s["median"] for s in report["layers"]]
    din = {d["layer"]: d["input_max"] for d in report["down_proj"]}
    dout = {d["layer"]: d["output_max"] for d in report["down_proj"]}
    rows = 2 if page else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(7, 0.28 * len(layers) + 3), 3.2 * rows), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    ax.semilogy(layers, resid, "o-", label="residual stream max |h| (after block)", color="C0")
    ax.semilogy(layers, med, ":", label="residual stream median |h|", color="C0", alpha=0.6)
    ax.semilogy(sorted(din), [din[k] for k in sorted(din)], "s-", ms=3, label="down_proj input max |x|", color="C1")
    ax.semilogy(sorted(dout), [dout[k] for k in sorted(dout)], "^-", ms=3, label="down_proj output max |y|",
                color="C2", alpha=0.7)
    onset = report.get("onset_layer")
    if onset is not None:
        ax.axvline(onset, color="red", ls="--", lw=1, label=f"massive onset (layer {onset})")
    ax.set_ylabel("max |activation|")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    if page:
        curve = page_layer_curve(page)
        ax2 = axes[1][0]
        ks = sorted(curve)
        ax2.semilogy(ks, [curve[k] for k in ks], "o-", color="C3", label="down_proj PAGE")
        dom = page.get("dominant")
        if dom and dom in page.get("modules", {}):
            dl = page["modules"][dom]["layer"]
            ax2.plot([dl], [curve[dl]], marker="s", ms=11, mfc="none", mec="red", mew=2, ls="",
                     label=f"dom ({dom})")
        if massive and massive.get("layer") in curve:
            ml = massive["layer"]
            ax2.plot([ml], [curve[ml]], marker="*", ms=12, color="gold", mec="black", ls="",
                     label=f"massive pick (layer {ml})")
        ax2.set_ylabel("PAGE")
        ax2.legend(fontsize=7, loc="best")
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("layer")
    axes[0][0].set_title(title or f"massive activations vs down_proj PAGE (N={report.get('n_samples')})", fontsize=9)
    fig.tight_layout()
    from domlora.io import save_figure

    return save_figure(fig, path)


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
    from domlora.io import atomic_outputs, read_json, write_json
    from domlora.models import config_hash, load_model
    from domlora.probes.massive import RULES, massive_predict, massive_summary
    from domlora.samples import encode_samples, read_samples

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

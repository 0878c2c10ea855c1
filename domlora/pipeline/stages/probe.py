"""probe stage: every step-0 signal (PAGE, NFN, activation statistics) of a model on a probe set."""
from __future__ import annotations

import logging
import os

from domlora.errors import ConfigError, ModelError
from domlora.io import atomic_outputs, write_json, write_text
from domlora.models import config_hash, load_model, load_tokenizer_and_config, resolve_dtype
from domlora.probes.activations import ffn_down_candidates
from domlora.probes.budget import check_batch_size, memory_model, plan_on_device, weight_bytes
from domlora.probes.massive import RULES, massive_summary, predict_from_report
from domlora.probes.nfn import check_form, nfn_reference_probe
from domlora.probes.page import check_lora_shape
from domlora.probes.step0 import step0_probe
from domlora.probes.summary import layer_type_matrix, nfn_summary, page_summary, plot_activations, plot_page_heatmap
from domlora.samples import encode_samples, read_samples
from domlora.probes.agreement import bootstrap_choice

logger = logging.getLogger(__name__)


PROBE_FILES = {"page": ("page.json", "page.png"), "nfn": ("nfn.json",),
               "activations": ("activations.json", "massive.json", "activations.png")}
"""what `probe` writes per signal"""


def probe(*, model: str, data: str | os.PathLike, out_dir: str | os.PathLike, samples: int = 32,
          max_length: int = 256, alpha: float = 16.0, rank: int = 8, batch_size: int | str = "auto",
          memory_fraction: float = 0.5, dtype: str = "auto", device: str | None = None, nfn: bool = True,
          activations: bool = True, massive_rule: str = "onset", trust_remote_code: bool = False,
          cache_dir: str | None = None, show_progress: bool = False, model_name: str | None = None,
          nfn_form: str = "reference") -> dict:
    """Probe stage: every step-0 signal from one pass over the probe set, written into `out_dir`.

    Writes `page.json` and `page.png` (PAGE), `nfn.json` (with `nfn`), and `activations.json`,
    `massive.json`, `activations.png` (with `activations`: the files `domlora diagnose` writes, the
    massive prediction compared with PAGE's `dom`). The batch size is `auto` (the largest whose
    batches fit `memory_fraction` of the free memory, `probes.budget`; on a CPU also at most
    `CPU_BATCH_TOKENS` padded tokens a batch, past which batches get slower) or a number checked
    against that budget. Inputs are checked before the weights load: the samples, the prompt lengths
    against `max_length`, the batch size against the budget.

    Returns:
        The `page.json` document.
    """
    import torch

    check_lora_shape(alpha, rank)
    check_form(nfn_form)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    check_batch_size(batch_size)
    if massive_rule not in RULES:
        raise ConfigError(f"unknown massive rule {massive_rule!r}; valid: {', '.join(RULES)}")
    chosen = read_samples(data, limit=samples)  # validate before loading the model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer, config = load_tokenizer_and_config(model, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    encoded, report = encode_samples(tokenizer, chosen, max_length=max_length)
    if len(chosen) < samples:
        logger.warning("asked for %d probe samples, %s holds %d", samples, data, len(chosen))
    mm = memory_model(config, dtype=torch_dtype)
    plan = plan_on_device(mm, encoded, batch_size=batch_size, device=device, memory_fraction=memory_fraction,
                          reserved=weight_bytes(config, dtype=torch_dtype, trust_remote_code=trust_remote_code))
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    if activations:
        try:
            ffn_down_candidates(loaded.model)
        except ModelError as exc:  # PAGE and NFN still apply; the statistics need each block's down_proj
            logger.warning("no activation statistics: %s", str(exc).split(";")[0])
            activations = False
    result = step0_probe(loaded.model, encoded, page=True, nfn=nfn and nfn_form == "squared", activations=activations,
                         alpha=alpha, rank=rank, batch_size=plan.batch_size, show_progress=show_progress)
    if nfn and nfn_form == "reference":  # PLoP's own input: the raw task prompts, a forward pass of their own
        result.nfn = nfn_reference_probe(loaded.model, tokenizer, chosen, batch_size=plan.batch_size,
                                         show_progress=show_progress)
    result.page.encode_report = report
    name = model_name or model
    doc = page_summary(result.page, model=name)
    # how often resampled probe sets pick the same dom / argmax: the uncertainty of "task-stable"
    doc["bootstrap"] = bootstrap_choice(result.page).to_dict()
    doc["data"] = str(data)
    doc["max_length"] = max_length
    doc["signals"] = ["page"] + (["nfn"] if nfn else []) + (["activations"] if activations else [])
    doc["batching"] = plan.to_dict() | {"n_batches": result.stats.n_batches, "n_tokens": result.stats.n_tokens,
                                        "n_padded_tokens": result.stats.n_padded}
    with atomic_outputs(out_dir) as stage:
        write_json(stage / "page.json", doc)
        plot_page_heatmap(doc, stage / "page.png")
        if nfn:
            write_json(stage / "nfn.json", nfn_summary(result.nfn, model=name))
        if activations:
            act = result.activations
            pred = predict_from_report(act, rule=massive_rule)
            mdoc = massive_summary(pred, act, model=name, config_hash=config_hash(loaded.model))
            mdoc["data"] = str(data)
            mdoc["page_dominant"] = doc["dominant"]
            mdoc["agrees_with_dom"] = doc["dominant"] == pred.module
            mdoc["page_argmax"] = doc["argmax"]
            acts = act.to_dict() | {"model": name, "data": str(data)}
            write_json(stage / "activations.json", acts)
            write_json(stage / "massive.json", mdoc)
            plot_activations(acts, stage / "activations.png", page=doc, massive=mdoc,
                             title=f"{name}: massive activations vs down_proj PAGE")
    logger.info("dominant module %s (%.1f%% of all PAGE); argmax %s", doc["dominant"],
                100 * doc.get("dominant_share_total", float("nan")), doc["argmax"])
    return doc


def probe_stage(params, model: str, dataset: str, *, layout, tracker=None, show_progress: bool = False) -> dict:
    """probe: probes/<model>/<dataset>/ page.json, page.png, page_layers.csv, and with the profile's signals
    nfn.json (NFN) and activations.json, massive.json, activations.png (the activation statistics)."""
    spec, p = params.models[model], params.probe
    out_dir = layout.probe_dir(model, dataset)
    doc = probe(model=spec.id, data=layout.split(dataset, "probe"), out_dir=out_dir, samples=p.samples,
                max_length=params.probe_max_length(dataset), alpha=p.alpha, rank=p.rank, batch_size=p.batch_size,
                memory_fraction=p.memory_fraction, dtype=spec.dtype, nfn=p.nfn, nfn_form=p.nfn_form,
                activations=p.activations,
                trust_remote_code=spec.trust_remote_code, show_progress=show_progress,
                model_name=spec.id)
    write_layer_csv(doc, layout.page_layers_csv(model, dataset))
    if tracker is not None:
        tracker.log_probe(model=model, dataset=dataset, layout=layout)
    return doc


def write_layer_csv(doc: dict, path) -> None:
    """PAGE by layer, one column per module type (DVC plots draw one line per type)."""
    types, grid = layer_type_matrix(doc)
    lines = ["layer," + ",".join(types)]
    for layer in range(len(grid[0])):
        lines.append(f"{layer}," + ",".join("" if v != v else f"{v:.6g}" for v in (row[layer] for row in grid)))
    write_text(path, "\n".join(lines) + "\n")



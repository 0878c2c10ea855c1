"""One function per pipeline stage, with path-level I/O; DVC stages and Prefect flows call these.

Each function reads only its declared inputs, validates them before any heavy work,
and replaces its outputs atomically (a failure leaves the previous outputs intact).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from domlora.errors import ConfigError
from domlora.io import atomic_outputs, read_json, write_json

logger = logging.getLogger(__name__)


def probe(*, model: str, data: str | os.PathLike, out_dir: str | os.PathLike, samples: int = 32,
          max_length: int = 256, alpha: float = 16.0, rank: int = 8, batch_size: int = 1, dtype: str = "auto",
          device: str | None = None, nfn: bool = True, trust_remote_code: bool = False,
          cache_dir: str | None = None, show_progress: bool = False, model_name: str | None = None) -> dict:
    """Probe stage: write `page.json`, `page.png` and (with `nfn`) `nfn.json` into `out_dir`."""
    from domlora.models import load_model
    from domlora.probes import nfn_probe, page_probe
    from domlora.probes.page import check_lora_shape
    from domlora.samples import encode_samples, read_samples
    from domlora.probes.summary import nfn_summary, page_summary, plot_page_heatmap

    check_lora_shape(alpha, rank)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    chosen = read_samples(data, limit=samples)  # validate before loading the model
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    encoded, report = encode_samples(loaded.tokenizer, chosen, max_length=max_length)
    if len(chosen) < samples:
        logger.warning("asked for %d probe samples, %s holds %d", samples, data, len(chosen))
    result = page_probe(loaded.model, encoded, alpha=alpha, rank=rank, batch_size=batch_size,
                        show_progress=show_progress)
    result.encode_report = report
    name = model_name or model
    doc = page_summary(result, model=name)
    doc["data"] = str(data)
    doc["max_length"] = max_length
    with atomic_outputs(out_dir) as stage:
        write_json(stage / "page.json", doc)
        plot_page_heatmap(doc, stage / "page.png")
        if nfn:
            n = nfn_probe(loaded.model, encoded, batch_size=max(batch_size, 8), show_progress=show_progress)
            write_json(stage / "nfn.json", nfn_summary(n, model=name))
    logger.info("dominant module %s (%.1f%% of all PAGE); argmax %s", doc["dominant"],
                100 * doc.get("dominant_share_total", float("nan")), doc["argmax"])
    return doc


def _read_scores(path: Path, what: str) -> dict:
    import json

    try:
        doc = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {path} is not valid JSON ({exc}); fix: pass the file written by "
                          "`domlora probe`") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} file {path} holds a {type(doc).__name__}, not a JSON object; fix: pass the "
                          "file written by `domlora probe`")
    return doc


def select_placement(*, probe_path: str | os.PathLike, strategy: str, out: str | os.PathLike,
                     nfn_path: str | os.PathLike | None = None, k: int = 3, types: tuple[str, ...] = (),
                     layers: tuple[int, ...] = (), seed: int = 0,
                     activations_path: str | os.PathLike | None = None, model=None,
                     data: str | os.PathLike | None = None, options: dict | None = None, samples: int | None = None,
                     max_length: int = 256, cache_dir: str | None = None, n_modules: int | None = None) -> dict:
    """Select stage: write a placement JSON (module names + evidence) from probe outputs.

    `nfn.json` (plop) and `massive.json` (massive) are read from beside the probe file unless given.
    The strategies that read the model (`placement.MODEL_STRATEGIES`: the peers kappa, aletheia, eva, and
    massive without a massive.json) load `model` (a `ModelSpec` or its id) and run on `data` (the probe
    split for aletheia and massive, the training split for eva; its first `samples` samples, eva: its
    option `samples`); their options are validated before the model is loaded, and the JSON gains the
    peer's `cost` (wall time, peak memory above the loaded model) and `scores`. With `n_modules`, a placement
    that adapts another number of modules is an error (a budget class's module count).
    """
    from domlora.placement import ACTIVATION_STRATEGIES, MODEL_STRATEGIES, PlacementSpec, select

    spec = PlacementSpec(strategy=strategy, k=k, types=tuple(types), layers=tuple(layers), seed=seed)
    probe_path = Path(probe_path)
    if not probe_path.is_file():
        raise ConfigError(f"probe file {probe_path} does not exist; fix: run `domlora probe` first")
    page = _read_scores(probe_path, "probe")
    if nfn_path and not Path(nfn_path).is_file():
        raise ConfigError(f"NFN file {nfn_path} does not exist; fix: pass the nfn.json written by `domlora probe`")
    nfn_file = Path(nfn_path) if nfn_path else probe_path.with_name("nfn.json")
    nfn = _read_scores(nfn_file, "NFN") if nfn_file.is_file() else None
    if activations_path and not Path(activations_path).is_file():
        raise ConfigError(f"activations file {activations_path} does not exist; fix: pass the massive.json written "
                          "by `domlora diagnose`")
    act_file = Path(activations_path) if activations_path else probe_path.with_name("massive.json")
    activations = _read_scores(act_file, "activations") if act_file.is_file() else None
    if options and strategy not in MODEL_STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} takes no peer options (got {', '.join(options)}); peer options "
                          f"belong to {', '.join(sorted(MODEL_STRATEGIES))}")
    peer = None
    if strategy in MODEL_STRATEGIES and not (strategy in ACTIVATION_STRATEGIES and activations is not None):
        peer = run_model_peer(strategy, model=model, data=data, options=options, samples=samples,
                              max_length=max_length, cache_dir=cache_dir)
        if strategy in ACTIVATION_STRATEGIES:
            activations = peer
    placement = select(spec, probe=page, nfn=nfn, activations=activations,
                       peer=None if strategy in ACTIVATION_STRATEGIES else peer)
    if n_modules is not None and len(placement.modules) != n_modules:
        raise ConfigError(f"strategy {strategy!r} placed {len(placement.modules)} modules, and its budget class adapts "
                          f"exactly {n_modules}; fix: move the method to a class of its size, or change its options")
    doc = placement.to_dict() | {"probe": str(probe_path)}
    if peer is not None:
        doc |= {"cost": peer["cost"], "options": peer.get("options", {}), "data": str(data) if data else None}
        if "scores" in peer:
            doc["scores"] = peer["scores"]
    write_json(out, doc)
    return doc


def run_model_peer(strategy: str, *, model, data, options: dict | None, samples: int | None, max_length: int,
                   cache_dir: str | None = None) -> dict:
    """Load the model (and data) a model-reading strategy needs and run it (`domlora.peers.run_peer`)."""
    from domlora.config import ModelSpec
    from domlora.peers import DATA, parse_options, run_peer

    opts = parse_options(strategy, options)  # an unknown option fails before the model is loaded
    if strategy == "aletheia":
        from domlora.peers import _aletheia_module

        _aletheia_module()  # a missing package fails before the model is loaded
    if model is None:
        raise ConfigError(f"strategy {strategy!r} reads the model; fix: pass --model (`embedded`, a hub id or a folder)")
    encoded = None
    chosen = None
    if DATA[strategy] is not None:
        if data is None:
            raise ConfigError(f"strategy {strategy!r} reads samples ({DATA[strategy]} split); fix: pass --data FILE.jsonl")
        from domlora.samples import read_samples

        limit = getattr(opts, "samples", None) or samples
        chosen = read_samples(data, limit=limit)
    from domlora.models import load_model

    spec = ModelSpec.of(model)
    loaded = load_model(spec, cache_dir=cache_dir)
    if chosen is not None:
        from domlora.samples import encode_samples

        length = getattr(opts, "max_length", None) or max_length
        encoded, _ = encode_samples(loaded.tokenizer, chosen, max_length=length)
    return run_peer(strategy, loaded.model, options=options, encoded=encoded, model_name=spec.id,
                    pad_id=loaded.tokenizer.pad_token_id or 0)


# ---------------------------------------------------------------- grid stages
# Each takes the validated `Params`, the cell (or its parts) and a `Layout`; DVC stage
# scripts and Prefect tasks both call these, so both write the same files.


def prepare_data_stage(params, dataset: str, *, layout, show_progress: bool = False) -> dict:
    """prepare_data: data/<dataset>/{train,probe,eval}.jsonl + stats.json."""
    from domlora.data import prepare_dataset

    spec = params.datasets[dataset]
    return prepare_dataset(spec.source, layout.data_dir(dataset), n_train=spec.n_train, n_probe=spec.n_probe,
                           n_eval=spec.n_eval, seed=params.seed_data, source=spec.path, show_progress=show_progress)


def probe_stage(params, model: str, dataset: str, *, layout, tracker=None, show_progress: bool = False) -> dict:
    """probe: probes/<model>/<dataset>/{page.json,page.png,nfn.json,page_layers.csv}."""
    spec, p = params.models[model], params.probe
    out_dir = layout.probe_dir(model, dataset)
    doc = probe(model=spec.id, data=layout.split(dataset, "probe"), out_dir=out_dir, samples=p.samples,
                max_length=params.probe_max_length(), alpha=p.alpha, rank=p.rank, batch_size=p.batch_size,
                dtype=spec.dtype,
                nfn=p.nfn, trust_remote_code=spec.trust_remote_code, show_progress=show_progress,
                model_name=spec.id)
    write_layer_csv(doc, out_dir / "page_layers.csv")
    if tracker is not None:
        tracker.log_probe(model=model, dataset=dataset, layout=layout)
    return doc


def write_layer_csv(doc: dict, path) -> None:
    """PAGE by layer, one column per module type (DVC plots draw one line per type)."""
    from domlora.io import write_text
    from domlora.probes.summary import layer_type_matrix

    types, grid = layer_type_matrix(doc)
    lines = ["layer," + ",".join(types)]
    for layer in range(len(grid[0])):
        lines.append(f"{layer}," + ",".join("" if v != v else f"{v:.6g}" for v in (row[layer] for row in grid)))
    write_text(path, "\n".join(lines) + "\n")


def select_stage(params, model: str, dataset: str, method: str, *, layout) -> dict:
    """select: placements/<model>/<dataset>/<method>.json.

    Strategies that read the model run here on the probe set the probe read (aletheia, massive) or on the
    training split (eva, with the method's own training keys, as its initialisation will run).
    """
    from domlora.peers import DATA

    m = params.methods[method]
    probe_set = params.select_probe(dataset)
    peer = {}
    if m.placement in DATA:
        split = DATA[m.placement]
        peer = {"model": params.models[model], "options": peer_options(params, method),
                "data": None if split is None else layout.split(probe_set if split == "probe" else dataset, split),
                "samples": params.probe.samples, "max_length": params.probe_max_length()}
    size = params.tune.budgets[m.budget].modules if m.budget is not None and params.tune is not None else None
    return select_placement(probe_path=layout.page_json(model, probe_set), strategy=m.placement,
                            out=layout.placement(model, dataset, method), k=m.k, types=tuple(m.types),
                            layers=tuple(m.layers_for(model)), seed=0, n_modules=size, **peer)


def peer_options(params, method: str) -> dict:
    """A model-reading method's peer options; EVA's are its training keys (so placement and init agree)."""
    m = params.methods[method]
    if m.placement != "eva":
        return dict(m.peer)
    cfg = params.train_config(method)
    return {"rank": cfg.rank, "alpha": cfg.alpha, "rho": cfg.eva_rho, "tau": cfg.eva_tau, "samples": cfg.eva_samples,
            "batch_size": cfg.eva_batch_size, "max_length": cfg.max_length}


def train_stage(params, cell, *, layout, tracker=None, show_progress: bool = False) -> dict:
    """train: runs/<cell>/adapter/, train_metrics.json (the run's `TrainRecord`), loss.csv.

    One resolved `TrainConfig` (the profile's `train:` + the method's overrides + the cell's seed) drives
    every regime: plain SFT (`train.train`), sparse-B SFT and GRPO (the method's `sparse_b:` / `grpo:`).
    """
    from domlora.pipeline.tracking import NullTracker
    from domlora.train import train

    tracker = tracker or NullTracker()
    m = params.methods[cell.method]
    spec = params.models[cell.model]
    cfg = params.train_config(cell.method, seed=cell.seed)
    from domlora.pipeline.tune import cell_overrides

    tuned = cell_overrides(params, cell, layout=layout)  # a budget class's chosen lr and training samples
    if tuned:
        cfg = cfg.replace(**tuned)
    out_dir = layout.run_dir(cell)
    placement = layout.placement(cell.model, cell.dataset, cell.method)
    data = layout.split(cell.dataset, "train")
    try:
        if m.grpo is not None:
            from domlora.studies.grpo import grpo

            grpo(model=spec, train_data=data, eval_data=layout.split(cell.dataset, "eval"), placement=placement,
                 out_dir=out_dir, cfg=cfg, settings=m.grpo, sparse_b=m.sparse_b, show_progress=show_progress)
        elif m.sparse_b is not None:
            from domlora.studies.sparse_b import sparse_b_sft

            sparse_b_sft(model=spec, train_data=data, placement=placement, out_dir=out_dir, cfg=cfg, spec=m.sparse_b,
                         show_progress=show_progress)
        else:
            train(model=spec, train_data=data, placement=placement, out_dir=out_dir, cfg=cfg,
                  show_progress=show_progress)
    except Exception as exc:
        tracker.mark_failed(cell=cell, error=f"{type(exc).__name__}: {exc}")
        raise
    write_loss_csv(layout.train_metrics(cell), layout.loss_csv(cell))
    tracker.log_cell(cell=cell, params=params, layout=layout, stage="train")
    return read_json(layout.train_metrics(cell))


def write_loss_csv(record_path, csv_path) -> None:
    """The loss curve of a `TrainRecord` (and GRPO's reward) as `step,loss[,reward]` rows for DVC plots."""
    from domlora.io import write_text
    from domlora.train import TrainRecord

    rec = TrainRecord.read(record_path)
    cols = ["loss"] + (["reward"] if rec.reward else [])
    rows = [",".join(["step"] + cols)]
    for i in range(max(len(rec.loss), len(rec.reward))):
        vals = [rec.loss[i] if i < len(rec.loss) else None, rec.reward[i] if i < len(rec.reward) else None]
        rows.append(",".join([str(i + 1)] + ["" if v is None or v != v else f"{v:.6g}" for v in vals[:len(cols)]]))
    write_text(csv_path, "\n".join(rows) + "\n")


def evaluate_stage(params, cell_or_base, *, layout, model: str | None = None, dataset: str | None = None,
                   tracker=None, show_progress: bool = False) -> dict:
    """evaluate: runs/<cell>/eval.json + scores.json (a cell), or runs/<model>-<dataset>-base/ (no adapter)."""
    from domlora.evaluate.run import evaluate

    if cell_or_base == "base":
        run_id, adapter = layout.base_id(model, dataset), None
    else:
        cell = cell_or_base
        model, dataset, run_id, adapter = cell.model, cell.dataset, cell.id, layout.adapter(cell)
    spec, e = params.models[model], params.eval
    doc = evaluate(model=spec, adapter=adapter, tasks=list(params.datasets[dataset].tasks),
                   out=layout.eval_json(run_id), data_dir=layout.root / "data", limit=e.limit,
                   batch_size=e.batch_size, max_gen_toks=e.max_gen_toks, allow_code_exec=e.allow_code_exec,
                   show_progress=show_progress)
    flat = doc.get("metrics", {})
    write_json(layout.scores_json(run_id), flat)
    if tracker is not None and cell_or_base != "base":
        tracker.log_cell(cell=cell_or_base, params=params, layout=layout, stage="evaluate")
    return doc

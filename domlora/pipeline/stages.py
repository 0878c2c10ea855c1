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
from domlora.studies.checkpoints import STEP_DIR
from domlora.studies.stability import bootstrap_choice

logger = logging.getLogger(__name__)


PROBE_FILES = {"page": ("page.json", "page.png"), "nfn": ("nfn.json",),
               "activations": ("activations.json", "massive.json", "activations.png")}
"""what `probe` writes per signal"""


def probe(*, model: str, data: str | os.PathLike, out_dir: str | os.PathLike, samples: int = 32,
          max_length: int = 256, alpha: float = 16.0, rank: int = 8, batch_size: int | str = "auto",
          memory_fraction: float = 0.5, dtype: str = "auto", device: str | None = None, nfn: bool = True,
          activations: bool = True, massive_rule: str = "onset", trust_remote_code: bool = False,
          cache_dir: str | None = None, show_progress: bool = False, model_name: str | None = None) -> dict:
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

    from domlora.models import config_hash, load_model, load_tokenizer_and_config, resolve_dtype
    from domlora.probes.budget import check_batch_size, memory_model, plan_on_device, weight_bytes
    from domlora.errors import ModelError
    from domlora.probes.activations import ffn_down_candidates
    from domlora.probes.massive import RULES, massive_summary, predict_from_report
    from domlora.probes.page import check_lora_shape
    from domlora.probes.step0 import step0_probe
    from domlora.probes.summary import nfn_summary, page_summary, plot_page_heatmap
    from domlora.samples import encode_samples, read_samples
    from domlora.studies.diagnostics import plot_activations

    check_lora_shape(alpha, rank)
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
    result = step0_probe(loaded.model, encoded, page=True, nfn=nfn, activations=activations, alpha=alpha, rank=rank,
                         batch_size=plan.batch_size, show_progress=show_progress)
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
    if strategy in ACTIVATION_STRATEGIES and activations is not None and options:
        raise ConfigError(f"strategy {strategy!r} reads {act_file}, which the probe already computed; its options "
                          f"({', '.join(options)}) apply only when it runs its own forward passes; fix: drop them, "
                          "or set the probe's rule (`domlora probe --massive-rule`)")
    if strategy in ACTIVATION_STRATEGIES and activations is None and model is None:
        if "signals" in page and "activations" not in page["signals"]:
            raise ConfigError(f"{strategy} needs the activation statistics, but this probe ran without them "
                              "(`domlora probe --no-activations`, or `activations: false` in the probe params); fix: "
                              "rerun `domlora probe` without --no-activations, or pass --model to run the predictor's "
                              "own forward passes")
        raise ConfigError(f"{strategy} needs {act_file.name} (written by `domlora probe` beside page.json), which is "
                          f"missing; fix: pass --activations DIR/massive.json, or --model to run the predictor's own "
                          "forward passes")
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
    kw = dict(n_train=spec.n_train, n_probe=spec.n_probe, n_eval=spec.n_eval, seed=params.seed_data,
              show_progress=show_progress)
    if not spec.stand_in:
        return prepare_dataset(spec.source, layout.data_dir(dataset), source=spec.path, **kw)
    import tempfile

    from domlora import rehearsal

    # rows in the hub dataset's own schema, read through the same loader as the real data
    with tempfile.TemporaryDirectory(prefix="domlora-stand-in-") as tmp:
        src = rehearsal.write_training_data(spec.source, Path(tmp) / f"{spec.source}.jsonl", seed=params.seed_data,
                                            n=spec.n_train + spec.n_probe + spec.n_eval)
        return prepare_dataset(spec.source, layout.data_dir(dataset), source=str(src), **kw,
                               source_label=f"stand-in rows in the {rehearsal.SCHEMA_OF[spec.source]} schema")


def probe_stage(params, model: str, dataset: str, *, layout, tracker=None, show_progress: bool = False) -> dict:
    """probe: probes/<model>/<dataset>/{page.json,page.png,nfn.json,page_layers.csv}."""
    spec, p = params.models[model], params.probe
    out_dir = layout.probe_dir(model, dataset)
    doc = probe(model=spec.id, data=layout.split(dataset, "probe"), out_dir=out_dir, samples=p.samples,
                max_length=params.probe_max_length(), alpha=p.alpha, rank=p.rank, batch_size=p.batch_size,
                memory_fraction=p.memory_fraction, dtype=spec.dtype, nfn=p.nfn, activations=p.activations,
                trust_remote_code=spec.trust_remote_code, show_progress=show_progress,
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
    from domlora.pipeline.launch import is_main_process
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
        if is_main_process():
            tracker.mark_failed(cell=cell, error=f"{type(exc).__name__}: {exc}")
        raise
    if is_main_process():  # one of several launched processes: the first writes what the others share
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
    kw = dict(model=spec, adapter=adapter, tasks=list(params.datasets[dataset].tasks), out=layout.eval_json(run_id),
              data_dir=layout.root / "data", limit=e.limit, batch_size=e.batch_size, max_gen_toks=e.max_gen_toks,
              allow_code_exec=e.allow_code_exec, show_progress=show_progress)
    if e.stand_in:
        doc = _evaluate_on_stand_ins(evaluate, kw)
    else:
        doc = evaluate(**kw)
    flat = doc.get("metrics", {})
    write_json(layout.scores_json(run_id), flat)
    if tracker is not None and cell_or_base != "base":
        tracker.log_cell(cell=cell_or_base, params=params, layout=layout, stage="evaluate")
    return doc


def _evaluate_on_stand_ins(evaluate, kw: dict) -> dict:
    """The same tasks on stand-in rows in each benchmark's schema, MT-Bench graded by a loopback judge."""
    import tempfile

    from domlora.evaluate.stand_in import stand_in_judge, write_stand_in_data

    with tempfile.TemporaryDirectory(prefix="domlora-stand-in-eval-") as tmp, stand_in_judge() as judge:
        write_stand_in_data(tmp)
        return evaluate(**kw, stand_in_data=tmp, judge=judge.config)


def checkpoints_stage(params, model: str, dataset: str, *, layout, launch=None, show_progress: bool = False) -> dict:
    """checkpoints (the Figure 2 study): full fine-tuning of `model` on `dataset`, PAGE of every module at each of
    the study's steps -> probes/<model>/<dataset>/checkpoints.{json,png}.

    The step checkpoints (whole models) live in a work folder only while they are probed. `launch`, when
    given, runs the fine-tuning on the recipe's processes (`launch(work_dir)`), as the train stage does.
    """
    import shutil

    from domlora.io import atomic_outputs
    from domlora.studies.checkpoints import plot_checkpoint_curves, probe_checkpoints

    study, spec, p = params.checkpoints, params.models[model], params.probe
    work = layout.root / ".checkpoints_work" / f"{model}-{dataset}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        if launch is not None:
            launch(work)
        else:
            finetune_checkpoints_stage(params, model, dataset, work=work, layout=layout, show_progress=show_progress)
        paths = [work / STEP_DIR.format(s) for s in sorted(set(study.steps))]
        doc = probe_checkpoints(paths, data=layout.split(dataset, "probe"), samples=p.samples,
                                max_length=params.probe_max_length(), alpha=p.alpha, rank=p.rank,
                                batch_size=p.batch_size, dtype=spec.dtype, show_progress=show_progress)
        doc["model"], doc["dataset"], doc["steps"] = model, dataset, sorted(set(study.steps))
        out = layout.checkpoints_json(model, dataset)
        with atomic_outputs(out.parent) as stage:
            write_json(stage / out.name, doc)
            plot_checkpoint_curves(doc, stage / "checkpoints.png",
                                   title=f"{spec.label or model}: PAGE across full fine-tuning checkpoints ({dataset})")
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finetune_checkpoints_stage(params, model: str, dataset: str, *, work, layout, show_progress: bool = False) -> dict:
    """The fine-tuning half of the checkpoint study (every launched process runs it; the first saves)."""
    from domlora.studies.checkpoints import finetune_checkpoints

    study = params.checkpoints
    cfg = params.train_config_for_study(study)
    steps = sorted(set(study.steps))
    return finetune_checkpoints(model=params.models[model], train_data=layout.split(dataset, "train"), out_dir=work,
                                steps=max(max(steps), 1), save_steps=steps, cfg=cfg, show_progress=show_progress)

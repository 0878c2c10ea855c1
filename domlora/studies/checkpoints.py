"""PAGE across checkpoints: does the dominant module stay put while a model is fine-tuned?

`probe_checkpoints` scores every candidate module by PAGE on each checkpoint (full
fine-tuning checkpoints, or a base with a trained adapter merged in) on one probe set, and
`plot_checkpoint_curves` draws the paper's Figure 2: one panel per module type, PAGE over
layers, one line per checkpoint. `finetune_checkpoints` makes such checkpoints: a full
fine-tuning run (every parameter trained, through `domlora.train.loop.train`) that saves the
model at chosen steps (0 = the untouched base). `checkpoints_stage` is the grid's `checkpoints` stage.

Run as: domlora checkpoints finetune --model embedded --data data/arith/train.jsonl --out ckpt --steps 20
        domlora checkpoints probe --checkpoint ckpt/step-0000 --checkpoint ckpt/step-0020 --data data/arith/probe.jsonl --out why/ckpt
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from domlora.adapters.variants import META_FILE, apply_adapter, read_adapter_meta
from domlora.errors import ConfigError, ModelError
from domlora.io import atomic_dir, atomic_outputs, save_figure, write_json
from domlora.models import LoadedModel, config_hash, load_model
from domlora.modules import PAPER_TYPES, TYPES
from domlora.probes.budget import check_batch_size, memory_model, plan_on_device
from domlora.probes.massive import massive_predict
from domlora.probes.page import check_lora_shape, page_probe
from domlora.probes.summary import page_summary
from domlora.samples import encode_samples, read_samples
from domlora.train.config import TrainConfig
from domlora.train.loop import train

logger = logging.getLogger(__name__)

STEP_DIR = "step-{:04d}"
MANIFEST = "checkpoints.json"
_STEP_RE = re.compile(r"(?:step|checkpoint)[-_]?(\d+)$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A trained adapter folder (domlora's or plain PEFT) rather than a full checkpoint."""
    p = Path(path)
    return (p / META_FILE).is_file() or (p / "adapter_config.json").is_file()


def step_of(path: str | os.PathLike) -> int | None:
    """The training step a folder name carries (`step-0010`, `checkpoint-10`), else None."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def load_checkpoint(path: str | os.PathLike, *, base: str | None = None, dtype: str = "float32",
                    device: str | None = None, cache_dir: str | os.PathLike | None = None):
    """Load a full checkpoint folder, or a base model with an adapter folder merged in.

    Args:
        path: a saved model folder (config.json + weights) or an adapter folder.
        base: the base model for an adapter (default: the one its metadata names).

    Raises:
        ModelError: missing folder, an adapter with no known base, or an adapter for another base.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"checkpoint {p} does not exist; fix: pass a saved model folder or an adapter folder")
    if not is_adapter_dir(p):
        return load_model(str(p), dtype=dtype, device=device, cache_dir=cache_dir)
    meta = read_adapter_meta(p)
    base = base or meta.get("base_model")
    if not base:
        raise ModelError(f"{p} is an adapter folder that does not name its base model; fix: pass --base MODEL")
    loaded = load_model(base, dtype=dtype, device=device, cache_dir=cache_dir)
    want = meta.get("base_config_hash")
    have = config_hash(loaded.model)
    if want and want != have:
        raise ModelError(f"adapter {p} was trained on an architecture with config hash {want}, but {base!r} has "
                         f"{have}; fix: pass the base model it was trained on (--base)")
    model = apply_adapter(loaded.model, p, merge=True)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, spec=f"{base}+{p}", path=str(p))


def layer_curves(page_doc: dict) -> dict[str, list[float]]:
    """type -> PAGE per layer (NaN where the type has no module in a layer), from a `page.json` dict."""
    mods = page_doc["modules"]
    n_layers = max(m["layer"] for m in mods.values()) + 1
    out: dict[str, list[float]] = {}
    for t in TYPES:
        rows = [m for m in mods.values() if m["type"] == t]
        if rows:
            curve = [math.nan] * n_layers
            for m in rows:
                curve[m["layer"]] = m["PAGE"] if math.isnan(curve[m["layer"]]) else curve[m["layer"]] + m["PAGE"]
            out[t] = curve
    return out


def probe_checkpoints(checkpoints: Sequence[str | os.PathLike], *, data: str | os.PathLike, samples: int = 32,
                      max_length: int = 256, alpha: float = 16.0, rank: int = 8, batch_size: int | str = 4,
                      base: str | None = None, labels: Sequence[str] | None = None, dtype: str = "float32",
                      device: str | None = None, cache_dir: str | os.PathLike | None = None,
                      massive: bool = False, show_progress: bool = False) -> dict:
    """PAGE of every module on each checkpoint, on the same probe samples.

    Args:
        checkpoints: full checkpoint folders and/or adapter folders (merged into `base`).
        data: chat JSONL probe set (its first `samples` samples are used).
        labels: one per checkpoint (default: `step N` from the folder name, else the folder name).
        batch_size: samples per PAGE pass, or `auto`: the largest that fits the device's free memory (decided
            once, on the first checkpoint, as the probe stage decides it).
        massive: also run the forward-only `massive` predictor on each checkpoint and record
            whether it agrees with that checkpoint's `dom`.

    Returns:
        The `checkpoints.json` document: per checkpoint its dom / argmax / shares and per-type layer curves.

    Raises:
        ConfigError: no checkpoints, or labels that do not match them.
        ModelError: a checkpoint that cannot be loaded, or one of another architecture than the first.
        DataError: a bad probe file.
    """
    check_lora_shape(alpha, rank)
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise ConfigError("no checkpoints given; fix: pass at least one checkpoint folder")
    check_batch_size(batch_size, name="batch_size")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"{len(labels)} labels for {len(paths)} checkpoints; fix: one label per checkpoint")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ModelError(f"checkpoint folder(s) do not exist: {missing[:3]}; fix: check the paths")
    chosen = read_samples(data, limit=samples)
    rows, ref_hash, ref_path, encoded = [], None, None, None
    for i, p in enumerate(paths):
        step = step_of(p)
        label = labels[i] if labels is not None else (f"step {step}" if step is not None else p.name)
        loaded = load_checkpoint(p, base=base, dtype=dtype, device=device, cache_dir=cache_dir)
        h = config_hash(loaded.model)
        if ref_hash is None:
            ref_hash, ref_path = h, p
            encoded, report = encode_samples(loaded.tokenizer, chosen, max_length=max_length)
            batch_size = plan_on_device(memory_model(loaded.model.config, dtype=loaded.model.dtype), encoded,
                                        batch_size=batch_size, device=next(loaded.model.parameters()).device).batch_size
        elif h != ref_hash:
            raise ModelError(f"checkpoint {p} has another architecture than {ref_path} (config hash {h} vs "
                             f"{ref_hash}: {type(loaded.model).__name__}); fix: compare checkpoints of one run")
        result = page_probe(loaded.model, encoded, alpha=alpha, rank=rank, batch_size=batch_size,
                            show_progress=show_progress)
        result.encode_report = report
        doc = page_summary(result, model=str(p))
        extra = {}
        if massive:
            pred, _ = massive_predict(loaded.model, encoded, batch_size=max(batch_size, 4))
            extra = {"massive": pred.module, "massive_agrees": pred.module == doc["dominant"],
                     "onset_layer": pred.onset_layer}
        rows.append(extra | {"label": label, "path": str(p), "step": step, "adapter": is_adapter_dir(p),
                     "dominant": doc["dominant"], "argmax": doc["argmax"],
                     "dominant_share_total": doc.get("dominant_share_total"),
                     "dominant_share_type": doc.get("dominant_share_type"),
                     "type_share": doc["type_share"], "seconds": result.seconds, "curves": layer_curves(doc)})
        logger.info("%s: dom %s (%.1f%% of down_proj PAGE), argmax %s", label, doc["dominant"],
                    100 * (doc.get("dominant_share_type") or math.nan), doc["argmax"])
        del loaded, result
        gc.collect()
    doms = {r["dominant"] for r in rows}
    argmaxes = {r["argmax"] for r in rows}
    return {"config_hash": ref_hash, "data": str(data), "n_samples": len(encoded), "max_length": max_length,
            "alpha": alpha, "rank": rank, "dominant_stable": len(doms) == 1, "argmax_stable": len(argmaxes) == 1,
            "dominants": [r["dominant"] for r in rows], "checkpoints": rows}


def plot_checkpoint_curves(doc: dict, path: str | os.PathLike, *, types: Sequence[str] = PAPER_TYPES,
                           title: str | None = None) -> Path:
    """The paper's Figure 2: per module type, PAGE over layers, one line per checkpoint (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["checkpoints"]
    if not rows:
        raise ConfigError("no checkpoints to plot")
    present = [t for t in types if t in rows[0]["curves"]] or [t for t in TYPES if t in rows[0]["curves"]]
    ncol = min(4, len(present))
    nrow = math.ceil(len(present) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for k, t in enumerate(present):
        ax = axes[k // ncol][k % ncol]
        for i, r in enumerate(rows):
            ys = r["curves"][t]
            ax.semilogy(range(len(ys)), ys, "-", marker=".", ms=3, lw=1.2, label=r["label"],
                        color=cmap(i / max(1, len(rows) - 1)))
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(present), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    axes[0][0].set_ylabel("PAGE")
    axes[0][0].legend(fontsize=7)
    stable = "stable" if doc.get("dominant_stable") else "moves"
    fig.suptitle(title or f"PAGE across checkpoints (dom {stable}: {rows[0]['dominant']})", fontsize=10)
    fig.tight_layout()

    return save_figure(fig, path)


def finetune_checkpoints(*, model, train_data: str | os.PathLike, out_dir: str | os.PathLike,
                         steps: int = 20, save_steps: Sequence[int] = (0, 1, 5, 10, 20), lr: float = 2e-5,
                         batch_size: int = 4, max_length: int = 160, seed: int = 0, warmup_ratio: float = 0.03,
                         cfg=None, all_parameters: bool = True, cache_dir: str | os.PathLike | None = None,
                         show_progress: bool = False) -> dict:
    """A full fine-tuning run that saves the whole model at `save_steps` (0 = before any update).

    Training goes through `domlora.train.loop.train` (variant `full`, every projection placed); with
    `all_parameters` the embeddings and norms train too (true full fine-tuning). Each saved step
    is a plain checkpoint folder `out_dir/step-NNNN` that `load_model` / `probe_checkpoints` read.

    Args:
        model: `embedded`, a hub id, a folder, or a `models.LoadedModel` (trained in place).
        train_data: chat JSONL.
        steps: optimizer steps (batch_size samples each, no accumulation).
        save_steps: steps at which to save (each in 0..steps).
        cfg: a `train.TrainConfig` to train with instead of (lr, batch_size, max_length, seed, warmup_ratio):
            the pipeline's, with variant `full`, max_steps = steps and no training checkpoints. Under several
            launched processes only the first saves the step folders.

    Returns:
        The manifest written to `out_dir/checkpoints.json` (paths, steps, the training metrics' loss).

    Raises:
        ConfigError: bad steps / save_steps.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    save = sorted(set(int(s) for s in save_steps))
    bad = [s for s in save if not 0 <= s <= steps]
    if bad or not save:
        raise ConfigError(f"save_steps must lie in 0..{steps} (0 = the base), got {list(save_steps)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg is None:
        cfg = TrainConfig(variant="full", lr=lr, max_steps=steps, batch_size=batch_size, grad_accum=1,
                          max_length=max_length, seed=seed, warmup_ratio=warmup_ratio, save_every=0,
                          gradient_checkpointing=False)
    else:
        cfg = cfg.replace(variant="full", max_steps=steps, save_every=0, layer_sampling="none")
    state: dict = {}
    saved: list[dict] = []
    main = int(os.environ.get("RANK", "0")) == 0

    def snapshot(step: int):
        if not main:
            return
        net = state["net"]
        target = out / STEP_DIR.format(step)
        with atomic_dir(target) as tmp:
            net.save_pretrained(str(tmp), safe_serialization=True)
            if state.get("tokenizer") is not None:
                state["tokenizer"].save_pretrained(str(tmp))
        saved.append({"step": step, "path": str(target)})
        logger.info("saved step %d to %s", step, target)

    def hook(net):
        state["net"] = net
        if all_parameters:
            for p in net.parameters():
                p.requires_grad_(True)
        if 0 in save:
            snapshot(0)

    def on_step(step: int, metrics: dict):
        if step in save:
            snapshot(step)

    loaded = model if isinstance(model, LoadedModel) else load_model(model, cache_dir=cache_dir)
    state["tokenizer"] = loaded.tokenizer
    metrics = train(model=loaded, train_data=train_data, placement=None, out_dir=out / "train", cfg=cfg,
                    on_step=on_step, model_hook=hook, show_progress=show_progress)
    # note: the `full` variant also writes every trained projection as an adapter; the step folders
    # hold the same weights (and the rest), so drop that copy (hundreds of MB on the embedded model)
    shutil.rmtree(out / "train" / "adapter", ignore_errors=True)
    manifest = {"base": str(loaded.spec), "steps": steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "all_parameters": all_parameters, "trainable_params": metrics.get("trainable_params"),
                "loss": metrics.get("loss"), "checkpoints": saved}
    if main:
        write_json(out / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- the grid stage


def checkpoints_stage(params, model: str, dataset: str, *, layout, launch=None, show_progress: bool = False) -> dict:
    """checkpoints (the Figure 2 study): full fine-tuning of `model` on `dataset`, PAGE of every module at each of
    the study's steps -> probes/<model>/<dataset>/checkpoints.{json,png}.

    The step checkpoints (whole models) live in a work folder only while they are probed. `launch`, when
    given, runs the fine-tuning on the recipe's processes (`launch(work_dir)`), as the train stage does.
    """
    study, spec, p = params.checkpoints, params.models[model], params.probe
    work = layout.checkpoints_work(model, dataset)
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
    study = params.checkpoints
    cfg = params.train_config_for_study(study)
    steps = sorted(set(study.steps))
    return finetune_checkpoints(model=params.models[model], train_data=layout.split(dataset, "train"), out_dir=work,
                                steps=max(max(steps), 1), save_steps=steps, cfg=cfg, show_progress=show_progress)

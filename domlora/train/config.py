"""The training recipe (`TrainConfig`, the one schema of params.yaml's `train:` and a method's overrides)
and the run record every trainer writes (`TrainRecord`, `train_metrics.json`)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from domlora.adapters.ist import ISTConfig
from domlora.adapters import Variant
from domlora.config import check_fields, from_dict, replace
from domlora.errors import ConfigError, DomloraError
from domlora.io import read_json, write_json

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
    """adapter variant (`adapters.VARIANTS`); `full` trains the placed modules' own weights"""
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


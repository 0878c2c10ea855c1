"""GRPO with a verifiable reward on the generated arithmetic task, through TRL's `GRPOTrainer`.

The reward of a completion is `answer_weight * [final answer correct] + format_weight * [it ends
with a parsable "#### <int>" line]`. The policy is a LoRA adapter on any placement, either
full (A and B train) or sparse-B (A frozen, k chosen entries of B; see `domlora.regimes.sparse_b`).
Gradient-informed selection scores entries on the GRPO objective itself: S probe rollouts at
the initial adapter, each a group of sampled completions with group-normalised advantages.

Sized for a CPU: a handful of steps, a small group, short completions. Two failure modes are
reported instead of silently wasting the run: rewards that never vary within a group (no
learning signal; a warning, and `no_signal: true` in the metrics) and completions that never
contain a parsable answer (a warning, and the parse rate in the metrics).
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domlora.adapters.variants import apply_adapter, save_adapter
from domlora.config import ModelSpec
from domlora.errors import ConfigError, DataError
from domlora.evaluate.answers import final_int, is_correct
from domlora.io import atomic_outputs, write_json
from domlora.models import LoadedModel, hub_id, load_model
from domlora.provenance import run_info
from domlora.regimes.arith import arith_accuracy, generate, read_prompts
from domlora.regimes.settings import GRPOSettings, check_reward_weights
from domlora.regimes.sparse_b import (DIAGNOSTICS, GradRecorder, attach_lora, b_sizes, install, landing, make_masks,
                                      method_label, module_info, outside_mask_nonzero, resolve_placement, save_masks)
from domlora.train.config import TrainRecord

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------- answers and rewards




def _completion_text(c: Any) -> str:
    # TRL passes strings for plain prompts and [{"role": "assistant", "content": ...}] for chat prompts
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return str(c)




class RewardLog:
    """Records every scored completion: rewards, parse success and per-group spread."""

    def __init__(self):
        self.calls: list[dict] = []

    def record(self, prompts: Sequence[Any], rewards: Sequence[float], parsed: Sequence[bool],
               correct: Sequence[bool]) -> None:
        groups: dict[str, list[float]] = {}
        for p, r in zip(prompts, rewards, strict=True):
            groups.setdefault(repr(p), []).append(float(r))
        zero_std = sum(1 for g in groups.values() if len(g) > 1 and max(g) == min(g))
        self.calls.append({"n": len(rewards), "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
                           "parse_rate": sum(parsed) / len(parsed) if parsed else 0.0,
                           "accuracy": sum(correct) / len(correct) if correct else 0.0,
                           "groups": len(groups), "groups_zero_std": zero_std})

    def summary(self) -> dict:
        if not self.calls:
            return {"calls": 0}
        n = sum(c["n"] for c in self.calls)
        groups = sum(c["groups"] for c in self.calls)
        zero = sum(c["groups_zero_std"] for c in self.calls)
        return {"calls": len(self.calls), "completions": n,
                "parse_rate": sum(c["parse_rate"] * c["n"] for c in self.calls) / n,
                "accuracy": sum(c["accuracy"] * c["n"] for c in self.calls) / n,
                "reward_mean": sum(c["reward_mean"] * c["n"] for c in self.calls) / n,
                "groups": groups, "groups_zero_std": zero,
                "frac_groups_zero_std": zero / groups if groups else 1.0}


@dataclass(frozen=True)
class ArithReward:
    """Verifiable reward on the arithmetic task: correct final answer + format."""

    answer_weight: float = 1.0
    format_weight: float = 0.2

    def __post_init__(self):
        check_reward_weights(self.answer_weight, self.format_weight)

    def score(self, completion: str, answer: Any) -> tuple[float, bool, bool]:
        """(reward, parsable, correct) of one completion."""
        parsed = final_int(completion) is not None
        correct = parsed and is_correct(completion, answer)
        return self.answer_weight * float(correct) + self.format_weight * float(parsed), parsed, correct

    def reward_func(self, log: RewardLog | None = None) -> Callable[..., list[float]]:
        """A TRL reward function (`prompts`, `completions`, dataset column `answer`)."""

        def arith_reward(prompts, completions, answer, **kwargs) -> list[float]:
            out, parsed, correct = [], [], []
            for c, a in zip(completions, answer, strict=True):
                r, p, ok = self.score(_completion_text(c), a)
                out.append(r)
                parsed.append(p)
                correct.append(ok)
            if log is not None:
                log.record(prompts, out, parsed, correct)
            return out

        return arith_reward


# ---------------------------------------------------------------- data




# ---------------------------------------------------------------- generation and evaluation










def sequence_logprob(model, prompt_ids, prompt_mask, completion_ids, *, pad_id: int):
    """Mean log-probability of each completion's tokens (up to and including its first EOS/pad)."""
    import torch

    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    comp_mask = torch.ones_like(completion_ids)
    # stop counting after the first pad/eos of each completion (generate pads finished rows)
    is_end = completion_ids == pad_id
    after = torch.cumsum(is_end.long(), dim=1) - is_end.long()
    comp_mask = (after == 0).long()
    att = torch.cat([prompt_mask, comp_mask], dim=1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, prompt_ids.shape[1] - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    m = comp_mask.to(logp.dtype)
    return (logp * m).sum(1) / m.sum(1).clamp_min(1.0)


def policy_probe_loss(model, tokenizer, rows: Sequence[dict], *, reward: ArithReward, num_generations: int,
                      prompts_per_step: int, max_new_tokens: int, temperature: float, seed: int,
                      max_tries: int = 1, log: RewardLog | None = None) -> Callable[[int], Any]:
    """`loss_fn(step)` whose gradient is the on-policy GRPO gradient on that step's prompts.

    Each step samples `num_generations` completions for `prompts_per_step` prompts, scores them,
    normalises rewards within each group and returns ``-mean(advantage * mean token log p)``.
    A group whose rewards are all equal contributes nothing (as in GRPO); with `max_tries` > 1 a
    step whose groups all have constant rewards is redrawn on the next prompts, up to that many
    times, so that each probe step carries some signal.
    """
    import random

    import torch

    if max_tries < 1:
        raise ConfigError(f"max_tries must be >= 1, got {max_tries}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cursor = {"next": 0}

    def draw(step: int, attempt: int):
        start = cursor["next"]
        cursor["next"] += prompts_per_step
        idx = [order[(start + j) % len(order)] for j in range(prompts_per_step)]
        chunk = [rows[i] for i in idx]
        was_training = model.training
        model.eval()
        enc, new, texts = generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens,
                                   do_sample=True, temperature=temperature, num_return_sequences=num_generations,
                                   seed=seed * 100_003 + step + 7919 * attempt)
        model.train(was_training)
        answers = [r["answer"] for r in chunk for _ in range(num_generations)]
        scored = [reward.score(t, a) for t, a in zip(texts, answers, strict=True)]
        r = torch.tensor([s[0] for s in scored], dtype=torch.float32).view(len(chunk), num_generations)
        if log is not None:
            log.record([str(i) for i in idx for _ in range(num_generations)], r.flatten().tolist(),
                       [s[1] for s in scored], [s[2] for s in scored])
        return enc, new, r

    def loss_fn(step: int):
        for attempt in range(max_tries):
            enc, new, r = draw(step, attempt)
            if bool((r.max(1).values > r.min(1).values).any()):
                break
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
        pids = enc["input_ids"].repeat_interleave(num_generations, dim=0)
        pmask = enc["attention_mask"].repeat_interleave(num_generations, dim=0)
        lp = sequence_logprob(model, pids, pmask, new, pad_id=pad)
        return -(adv.to(lp.device) * lp).mean()

    return loss_fn


# ---------------------------------------------------------------- the run


@dataclass
class RunState:
    """What a GRPO run collects while it trains."""

    reward_curve: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _with_system(rows: list[dict], system: str | None) -> list[dict]:
    if not system:
        return rows
    return [{"prompt": [{"role": "system", "content": system}] + [m for m in r["prompt"] if m.get("role") != "system"],
             "answer": r["answer"]} for r in rows]


def check_signal(log: RewardLog, state: RunState) -> dict:
    """Turn a reward log into warnings: constant rewards (no signal), nothing parsable."""
    s = log.summary()
    s["no_signal"] = bool(s.get("calls")) and s["groups_zero_std"] == s["groups"]
    s["never_parsable"] = bool(s.get("calls")) and s["parse_rate"] == 0.0
    if s["no_signal"]:
        msg = (f"GRPO rewards were constant within every group ({s['groups']} groups): no learning signal, the "
               "adapter did not move; fix: more generations per prompt, a higher temperature, longer completions, "
               "or a partial-credit (format) reward")
        logger.warning(msg)
        state.warnings.append(msg)
    if s["never_parsable"]:
        msg = (f"none of the {s['completions']} sampled completions had a parsable `#### <int>` answer; fix: "
               "raise max_completion_length, add a system prompt asking for the format, or warm up with SFT")
        logger.warning(msg)
        state.warnings.append(msg)
    return s


def train_grpo(peft_model, tokenizer, rows: list[dict], *, settings: GRPOSettings, cfg, steps: int, work_dir: Path,
               recorder=None, log: RewardLog | None = None, state: RunState | None = None,
               show_progress: bool = False) -> dict:
    """Run TRL's GRPOTrainer on an already-prepared PEFT model (masks, if any, installed).

    Returns the trainer's log history and timings.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    state = state or RunState()
    log = log or RewardLog()
    reward = ArithReward(settings.reward_answer_weight, settings.reward_format_weight)
    ds = Dataset.from_list(rows)
    per_device = settings.prompts_per_step * settings.num_generations
    schedule = {"cosine": "cosine", "linear": "linear",
                "constant": "constant_with_warmup" if cfg.warmup_ratio > 0 else "constant"}[cfg.lr_schedule]
    targs = GRPOConfig(
        output_dir=str(work_dir), max_steps=steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1, num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature, top_p=1.0,
        learning_rate=cfg.lr, lr_scheduler_type=schedule, warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
        max_grad_norm=cfg.max_grad_norm, use_cpu=not _on_gpu(peft_model), bf16=False, fp16=False, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=not show_progress, seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, log_completions=False, remove_unused_columns=False)

    class _Hooks(TrainerCallback):
        def on_step_end(self, args, tstate, control, **kw):
            if recorder is not None:
                recorder.end_step(tstate.global_step)

        def on_log(self, args, tstate, control, logs=None, **kw):
            if logs and "reward" in logs:
                nan = float("nan")
                state.reward_curve.append({"step": tstate.global_step, "reward": float(logs["reward"]),
                                           "loss": float(logs.get("loss", nan)),
                                           "reward_std": float(logs.get("reward_std", nan)),
                                           "frac_reward_zero_std": float(logs.get("frac_reward_zero_std", nan)),
                                           "completion_length": float(logs.get("completions/mean_length", nan))})

    trainer = GRPOTrainer(model=peft_model, reward_funcs=[reward.reward_func(log)], args=targs, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[_Hooks()])
    trainer.remove_callback(PrinterCallback)
    if not show_progress:
        trainer.remove_callback(ProgressCallback)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "log_history": trainer.state.log_history, "steps": trainer.state.global_step}


def _on_gpu(model) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _load(model):
    if isinstance(model, LoadedModel):
        return model, getattr(model, "spec", "model")
    if isinstance(model, (str, ModelSpec)):
        spec = ModelSpec.of(model)
        return load_model(spec), spec.id
    raise ConfigError(f"model must be a model spec (`embedded`, a hub id, a folder) or a LoadedModel, "
                      f"got {type(model).__name__}")


def _peak_memory_mb(model) -> float:
    import torch

    if next(model.parameters()).is_cuda:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _adapter_digest(adapter_dir) -> str:
    """Content hash of an adapter's weights (so a changed warm start retrains)."""
    import hashlib

    d = Path(adapter_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"init adapter {d} holds no weights (*.safetensors); fix: pass the `adapter/` folder "
                          "of a finished training run")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]




def grpo(*, model, train_data: str | os.PathLike, eval_data: str | os.PathLike, placement, out_dir: str | os.PathLike,
         cfg, settings: GRPOSettings | None = None, sparse_b=None, init_adapter: str | os.PathLike | None = None,
         show_progress: bool = False) -> dict:
    """GRPO stage: train a full-LoRA or sparse-B adapter with TRL, evaluate it, write its record.

    Writes `out_dir/adapter/` (PEFT adapter, plus the sparse-B masks and the study's `diagnostics.json`)
    and `out_dir/train_metrics.json` (a `train.TrainRecord`, regime `grpo`, whose `study` holds the
    GRPO and sparse-B settings as run and their outcome), all together and atomically: a failed run
    leaves the previous outputs as they were.

    Args:
        model: a `ModelSpec` or its id, or a LoadedModel (its model gets the adapter).
        train_data: chat JSONL whose assistant turns end with `#### <int>` (or eval-style rows).
        eval_data: rows with `question` + `answer` (the arith eval split).
        placement: a Placement, its dict / JSON path, module names, or None (every projection).
        cfg: the `train.TrainConfig`: LoRA rank and alpha, learning rate and schedule, max_steps (or epochs
            over the prompts), seed (A's init, the selection, the sampling, the data order).
        settings: GRPO's own settings (group size, completion length, rewards, evaluation).
        sparse_b: a `sparse_b.SparseBSpec` (k entries of B, A frozen), or None for full LoRA.
        init_adapter: an adapter folder (e.g. an SFT run's `adapter/`) merged into the base model
            before the GRPO adapter is attached: GRPO from a warm start instead of the base model.

    Returns:
        The study's outcome (also in the record's `study["outcome"]`).
    """
    import dataclasses

    import torch

    settings = settings or GRPOSettings()
    if cfg.variant != "lora":
        raise ConfigError(f"GRPO trains a plain LoRA adapter, but the method's variant is {cfg.variant!r}; "
                          "fix: variant lora for GRPO methods")
    seed = cfg.seed
    spec = None if sparse_b is None else dataclasses.replace(sparse_b, seed=seed)
    k, selection = (None, None) if spec is None else (spec.k, spec.selection)
    modules = None if placement is None else resolve_placement(placement)
    label = method_label("grpo", k, selection)
    out_dir = Path(out_dir)
    # read and validate all inputs before the model loads
    if init_adapter is not None:
        _adapter_digest(init_adapter)
    rows = _with_system(read_prompts(train_data, limit=settings.n_train), settings.system_prompt)
    eval_rows = _with_system(read_prompts(eval_data, limit=settings.n_eval), settings.system_prompt)
    if len(rows) < settings.prompts_per_step:
        raise DataError(f"{train_data} has {len(rows)} usable prompts, fewer than prompts_per_step="
                        f"{settings.prompts_per_step}; fix: more training rows or fewer prompts per step")
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * len(rows) / settings.prompts_per_step))

    loaded, model_name = _load(model)
    tok = loaded.tokenizer
    if init_adapter is not None:
        loaded.model = apply_adapter(loaded.model, init_adapter, merge=True)
    info = module_info(loaded.model)
    if modules is None:  # no placement: every projection (vanilla LoRA's placement)
        modules = list(info)
    t_start = time.perf_counter()
    pm = attach_lora(loaded.model, modules, rank=cfg.rank, alpha=cfg.alpha, seed=seed)
    sizes = b_sizes(pm)
    state = RunState()
    log = RewardLog()
    probe_log = RewardLog()
    recorder = GradRecorder(max_steps=steps, seed=seed)
    reward = ArithReward(settings.reward_answer_weight, settings.reward_format_weight)
    base_eval = None
    if settings.eval_base:
        with pm.disable_adapter():
            base_eval = arith_accuracy(pm, tok, eval_rows, max_new_tokens=settings.eval_max_new_tokens,
                                       batch_size=settings.eval_batch_size, show_progress=show_progress)
    masks, scoring = _choose_entries(pm, tok, rows, spec=spec, settings=settings, reward=reward,
                                     probe_log=probe_log, state=state, seed=seed, show_progress=show_progress)
    handle = install(pm, masks, recorder=recorder)
    torch.manual_seed(seed)
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="grpo-") as work:
            tr = train_grpo(pm, tok, rows, settings=settings, cfg=cfg, steps=steps, work_dir=Path(work),
                            recorder=recorder, log=log, state=state, show_progress=show_progress)
    finally:
        handle.remove()
    signal = check_signal(log, state)
    leaked = outside_mask_nonzero(pm, masks) if masks is not None else 0
    if leaked:
        msg = f"{leaked} B entries outside the mask moved during training"
        logger.warning(msg)
        state.warnings.append(msg)
    ev = arith_accuracy(pm, tok, eval_rows, max_new_tokens=settings.eval_max_new_tokens,
                        batch_size=settings.eval_batch_size, show_progress=show_progress)
    total_s = time.perf_counter() - t_start
    trainable = (sum(p.numel() for p in pm.parameters() if p.requires_grad) if masks is None
                 else int(sum(int(m.sum()) for m in masks.values())))
    land = landing(masks, info) if masks is not None else None
    metrics = _outcome(label=label, k=k, selection=selection, spec=spec, seed=seed, model_name=model_name,
                       modules=modules, trainable=trainable, sizes=sizes, tr=tr, scoring=scoring, state=state, ev=ev,
                       base_eval=base_eval, signal=signal, leaked=leaked, land=land, recorder=recorder,
                       total_s=total_s)
    diagnostics = {"regime": "grpo", "method": label, "landing": land, "scoring": scoring,
                   "grad_steps": recorder.steps, "grad_summary": recorder.summary(),
                   "reward_log": log.calls, "eval_samples": ev["samples"],
                   "base_eval_samples": None if base_eval is None else base_eval["samples"]}
    _write(out_dir, pm, masks, cfg=cfg, settings=settings, spec=spec, init_adapter=init_adapter, label=label,
           model_name=model_name, loaded=loaded, placement=placement, modules=modules, metrics=metrics,
           diagnostics=diagnostics, steps=steps, tr=tr, total_s=total_s, trainable=trainable, rows=rows,
           train_data=train_data)
    logger.info("%s: reward %.3f -> %.3f, eval accuracy %.3f (n=%d), %.1fs", label, metrics["reward_first"] or 0,
                metrics["reward_last"] or 0, ev["accuracy"], ev["n"], total_s)
    return metrics


def _choose_entries(pm, tok, rows, *, spec, settings: GRPOSettings, reward: ArithReward, probe_log: RewardLog,
                    state: RunState, seed: int, show_progress: bool) -> tuple[dict | None, dict | None]:
    """Sparse-B's masks (scored on the GRPO objective unless random) and their scoring, or (None, None)."""
    if spec is None:
        return None, None
    loss_fn = None
    if spec.selection != "random":
        loss_fn = policy_probe_loss(pm, tok, rows, reward=reward, num_generations=settings.num_generations,
                                    prompts_per_step=spec.probe_batch_size,
                                    max_new_tokens=settings.max_completion_length,
                                    temperature=settings.temperature, seed=seed,
                                    max_tries=settings.probe_max_tries, log=probe_log)
    masks, scoring = make_masks(pm, spec, loss_fn, show_progress=show_progress)
    ps = probe_log.summary()
    scoring["probe_rewards"] = ps
    if ps.get("calls") and ps["groups_zero_std"] == ps["groups"]:
        msg = ("every probe rollout had constant rewards, so the gradient scores are all zero and the informed "
               "choice reduces to tie-breaking; fix: more probe steps or generations")
        logger.warning(msg)
        state.warnings.append(msg)
    return masks, scoring


def _outcome(*, label, k, selection, spec, seed, model_name, modules, trainable, sizes, tr, scoring, state: RunState,
             ev, base_eval, signal, leaked, land, recorder, total_s) -> dict:
    """The run's outcome: what the report reads (`study.outcome` of its record)."""
    curve = state.reward_curve
    half = max(1, len(curve) // 2)
    metrics = {
        "status": "success", "regime": "grpo", "method": label, "k": k,
        "selection": None if k is None else selection, "budget": None if spec is None else spec.budget,
        "seed": seed, "model": model_name, "n_modules": len(modules),
        "trainable_entries": trainable, "b_entries": sum(sizes.values()),
        "train_seconds": tr["seconds"], "steps": tr["steps"],
        "score_seconds": scoring["seconds"] if scoring else 0.0,
        "score_fraction": (scoring["seconds"] / tr["seconds"]) if scoring and tr["seconds"] > 0 else 0.0,
        "reward_first": statistics.fmean(c["reward"] for c in curve[:half]) if curve else None,
        "reward_last": statistics.fmean(c["reward"] for c in curve[-half:]) if curve else None,
        "reward_curve": curve,
        "eval": {k_: v for k_, v in ev.items() if k_ != "samples"},
        "eval_accuracy": ev["accuracy"],
        "base_eval": None if base_eval is None else {k_: v for k_, v in base_eval.items() if k_ != "samples"},
        "rewards": signal, "no_signal": signal["no_signal"], "never_parsable": signal["never_parsable"],
        "outside_mask_nonzero": leaked,
        "vod_share": land["vod_share"] if land else None,
        "landing_by_type": None if land is None else {t: r["share_selected"] for t, r in land["by_type"].items()},
        "grad": recorder.summary(),
        "total_seconds": total_s,
        "warnings": state.warnings,
    }
    return metrics


def _write(out_dir: Path, pm, masks, *, cfg, settings: GRPOSettings, spec, init_adapter, label, model_name, loaded,
           placement, modules, metrics, diagnostics, steps, tr, total_s, trainable, rows, train_data) -> None:
    """The adapter (masks and diagnostics beside it) and the `TrainRecord`, together and atomically."""
    import dataclasses

    curve = metrics["reward_curve"]
    peak = _peak_memory_mb(pm)
    record = TrainRecord(
        config=dataclasses.asdict(cfg), regime="grpo",
        model={"id": model_name, "hub_id": hub_id(model_name), "path": getattr(loaded, "path", None)},
        placement={"strategy": "explicit" if placement is not None else "all", "modules": list(modules),
                   "n_modules": len(modules)},
        study={"grpo": settings.to_dict(), "sparse_b": None if spec is None else spec.to_dict(),
               "init_adapter": None if init_adapter is None else str(init_adapter), "outcome": metrics},
        status="success", steps=steps, completed_steps=tr["steps"],
        samples_per_step=settings.prompts_per_step * settings.num_generations, device=str(pm.device),
        loss=[c.get("loss") for c in curve], reward=[c["reward"] for c in curve],
        train_time_s=round(tr["seconds"], 3), wall_time_s=round(total_s, 3), peak_memory_mb=peak,
        trainable_params=trainable, total_params=sum(p.numel() for p in pm.parameters()), n_modules=len(modules),
        data={"path": str(train_data), "n_samples": len(rows)}, run_info=run_info())
    with atomic_outputs(out_dir) as stage:
        save_adapter(pm, stage / "adapter", variant="lora",
                     meta={"base_model": hub_id(model_name), "base_model_local": getattr(loaded, "path", None),
                           "rank": cfg.rank, "alpha": cfg.alpha, "method": label, "placement": modules,
                           "trainable_params": trainable})
        if masks is not None:
            save_masks(stage / "adapter", masks, meta={"spec": spec.to_dict(), "modules": modules,
                                                       "regime": "grpo"})
        write_json(stage / "adapter" / DIAGNOSTICS, diagnostics)
        record.write(stage / "train_metrics.json")

"""Evaluate a base model, or base + adapter, on lm-eval tasks and MT-Bench; write eval.json.

Each task runs in its own lm-eval evaluation (`run_lm_eval`) over one `HFLM` wrapping the loaded
model, so one failing task never loses the others, and eval.json is rewritten (atomically)
after every task. A rerun with the same model, adapter and settings evaluates only the tasks
that are missing, failed or skipped, or whose configuration changed.

Protocols (see `TASKS` and docs/evaluate.md): generative tasks decode greedily (the paper:
temperature 0 for every benchmark) under the model's chat template and extract the answer;
multiple-choice benchmarks (MMLU, CommonsenseQA, TruthfulQA, LogiQA) compare the
log-likelihoods of the options, which is what greedy decoding of a single answer letter picks
when the model answers in the expected format, without the parsing failures. Code is executed
only when allowed (`allow_code_exec=True` or HF_ALLOW_CODE_EVAL=1), in `domlora.sandbox`.

Run as: domlora evaluate --model embedded --adapter runs/X/adapter --tasks embedded --data-dir data --out eval.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .errors import ConfigError, DomloraError, ModelError
from .eval_tasks import TASKS_DIR
from .io import file_sha256, read_json, write_json
from .judge import JudgeConfig, JudgeError, why_unconfigured

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CPU_BATCH_SIZE = 32
"""what `batch_size="auto"` means on CPU (lm-eval's auto-detection probes with full-length
batches, far too slow on CPU); chosen by bench/eval.py on the 2-core reference machine"""
MAX_LENGTH = 4096
"""context cap handed to HFLM: long enough for every task here, small enough for auto batch sizing"""
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class TaskSpec:
    """How domlora runs one evaluation task (the protocol is chosen here, per task)."""

    name: str
    """the name users pass to --tasks"""
    lm_eval: str | None
    """lm-eval task or group to run; None for tasks domlora runs itself (MT-Bench)"""
    protocol: str
    """one line: decoding, prompt, answer extraction, metric"""
    headline: str
    """the metric (in eval.json naming) that the paper's tables report"""
    chat_template: bool = True
    """render prompts (and few-shot turns) with the model's chat template"""
    local_data: str | None = None
    """dataset folder under --data-dir holding eval.jsonl (embedded tasks)"""
    code_exec: bool = False
    """runs generated code: needs allow_code_exec"""


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # ---- embedded (offline, local JSONL written by `domlora prepare`)
    TaskSpec("arith", "arith", "generative, greedy, chat template, 0-shot; exact match of the final "
             "`#### N` line (exact_match_flex: last number when the line is missing)", "exact_match",
             local_data="arith"),
    TaskSpec("strings", "strings", "generative, greedy, chat template, 0-shot; exact match of the final "
             "`#### answer` line (exact_match_flex: last line when it is missing)", "exact_match",
             local_data="strings"),
    TaskSpec("humaneval_local", "humaneval_local", "generative, greedy, chat template, the training prompt; "
             "first code block run against the problem's tests in the sandbox; pass@1", "pass@1",
             local_data="humaneval", code_exec=True),
    # ---- instruct (Table 1)
    TaskSpec("mmlu", "mmlu", "log-likelihood of the answer letter A-D, 0-shot, chat template; accuracy "
             "over the 57 subjects weighted by size", "acc"),
    TaskSpec("tydiqa", "tydiqa", "TyDiQA GoldP, generative, greedy, 1-shot, chat template; exact match "
             "(and F1) averaged over 9 languages", "exact_match"),
    TaskSpec("commonsense_qa", "commonsense_qa", "log-likelihood of the answer letter A-E, 0-shot, chat "
             "template, validation split; accuracy", "acc"),
    TaskSpec("truthfulqa_mc2", "truthfulqa_mc2", "TruthfulQA MC2: normalised probability mass on the true "
             "answers (log-likelihood), 6-shot QA preamble, chat template", "acc"),
    TaskSpec("gsm8k_cot_llama", "gsm8k_cot_llama", "GSM8K, generative, greedy, 8-shot chain of thought as "
             "chat turns; exact match of the last number (strict: 'The final answer is N')",
             "exact_match_flexible_extract"),
    TaskSpec("logiqa", "logiqa", "log-likelihood of the four options, 0-shot, chat template; accuracy", "acc"),
    # ---- math (Table 2)
    TaskSpec("minerva_math", "minerva_math", "MATH (5000 problems), generative, greedy, 4-shot Minerva "
             "prompt as chat turns; exact match of the boxed/final answer after sympy normalisation "
             "(needs lm-eval[math])", "exact_match"),
    # ---- code (Table 2)
    TaskSpec("humaneval_sandbox", "humaneval_sandbox", "HumanEval, generative, greedy, lm-eval's instruct "
             "prompt with the signature as assistant prefix, chat template; run in the sandbox; pass@1",
             "pass@1", code_exec=True),
    TaskSpec("humaneval_plus_sandbox", "humaneval_plus_sandbox", "HumanEval+ (EvalPlus tests), as "
             "humaneval_sandbox; pass@1", "pass@1", code_exec=True),
    # ---- chat (Table 2)
    TaskSpec("mt_bench", None, "MT-Bench, 80 two-turn questions, greedy answers under the chat template "
             "(1024 new tokens per turn), single-answer grading 1-10 by an OpenAI-compatible judge "
             "(FastChat prompts); mean over both turns", "score"),
]}

SELF_CONTAINED = frozenset({"arith", "strings", "humaneval_local", "humaneval_sandbox", "humaneval_plus_sandbox",
                            "mt_bench"})
"""tasks that need none of lm-eval's own task library (indexing it takes ~15 s)"""

SUITES: dict[str, list[str]] = {
    "embedded": ["arith", "strings", "humaneval_local"],
    "instruct": ["mmlu", "tydiqa", "commonsense_qa", "truthfulqa_mc2", "gsm8k_cot_llama", "logiqa"],
    "math": ["gsm8k_cot_llama", "minerva_math"],
    "code": ["humaneval_sandbox", "humaneval_plus_sandbox"],
    "chat": ["mt_bench"],
}

# paper column -> (task, metric); values are fractions except MT-Bench (1-10)
PAPER_COLUMNS: dict[str, tuple[str, str]] = {
    "MMLU": ("mmlu", "acc"), "TyDiQA": ("tydiqa", "exact_match"), "CQA": ("commonsense_qa", "acc"),
    "TruthfulQA": ("truthfulqa_mc2", "acc"), "GSM8K": ("gsm8k_cot_llama", "exact_match_flexible_extract"),
    "LogiQA": ("logiqa", "acc"), "MATH": ("minerva_math", "exact_match"),
    "HumanEval": ("humaneval_sandbox", "pass@1"), "HumanEval+": ("humaneval_plus_sandbox", "pass@1"),
    "MT-Bench": ("mt_bench", "score"),
}

# The paper's Tables 1 and 2 (seed 000). MT-Bench is printed x10 there, as in the averages.
PAPER_TABLES: dict[int, dict] = {
    1: {"columns": ["MMLU", "TyDiQA", "CQA", "TruthfulQA", "GSM8K", "LogiQA"], "rows": {
        "Qwen3-8B": {
            "LoRA": ("334M", [71.0, 68.8, 81.3, 73.3, 87.0, 56.2], 72.9),
            "PLoP": ("131M", [70.9, 70.8, 82.1, 71.9, 89.8, 57.3], 73.8),
            "IST": ("334M", [70.3, 69.0, 80.8, 74.5, 91.3, 56.8], 73.8),
            "DomLoRA": ("2.1M", [71.4, 71.4, 82.6, 72.6, 92.6, 56.5], 74.5)},
        "LLaMA-3.1-8B": {
            "LoRA": ("321M", [63.5, 67.2, 69.8, 45.2, 81.4, 37.6], 60.8),
            "PLoP": ("125M", [61.8, 69.6, 70.9, 44.7, 81.3, 35.3], 60.6),
            "IST": ("321M", [62.5, 69.1, 73.7, 38.8, 82.5, 36.9], 60.6),
            "DomLoRA": ("2.3M", [64.1, 69.9, 73.5, 54.4, 85.5, 41.2], 64.8)}}},
    2: {"columns": ["GSM8K", "MATH", "HumanEval", "HumanEval+", "MT-Bench"], "rows": {
        "Qwen3-8B": {
            "LoRA": ("334M", [86.66, 51.30, 61.0, 56.1, 62.50], 63.5),
            "PLoP": ("131M", [87.6, 54.3, 62.8, 58.5, 69.1], 66.5),
            "IST": ("334M", [87.2, 51.2, 65.9, 61.0, 63.2], 65.7),
            "DomLoRA": ("2.1M", [92.7, 65.6, 64.6, 59.8, 75.9], 71.7)},
        "LLaMA-3.1-8B": {
            "LoRA": ("321M", [83.2, 38.6, 45.1, 42.1, 61.6], 54.1),
            "PLoP": ("125M", [82.3, 41.0, 43.3, 40.2, 60.8], 53.5),
            "IST": ("321M", [83.3, 41.6, 45.1, 42.1, 62.1], 54.9),
            "DomLoRA": ("2.3M", [85.1, 45.0, 53.0, 50.0, 67.0], 60.0)}}},
}

TaskStatus = Literal["success", "failed", "skipped"]


# ------------------------------------------------------------------------------------------
# task names
# ------------------------------------------------------------------------------------------

def _local_task_manager(data_dir: Path | None):
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(data_dir)} if data_dir is not None else {}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)


def _full_task_manager(data_dir: Path | None):
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(data_dir)} if data_dir is not None else {}
    logger.info("indexing lm-eval's task library (~15 s)")
    return TaskManager(include_path=str(TASKS_DIR), metadata=meta)


def expand_tasks(tasks: Sequence[str] | str) -> list[str]:
    """Split a comma list, expand suite names, drop repeats (order kept). Names are not checked."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if not name:
            continue
        for t in SUITES.get(name, [name]):
            if t not in out:
                out.append(t)
    if not out:
        raise ConfigError(f"no tasks given; fix: pass --tasks with a suite ({', '.join(SUITES)}) or task names")
    return out


def resolve_tasks(tasks: Sequence[str] | str, *, task_manager=None) -> list[str]:
    """Expand suites and check every name: domlora's tasks, or any task/group lm-eval knows.

    Raises:
        ConfigError: an unknown name; the message lists close matches.
    """
    names = expand_tasks(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        tm = task_manager or _full_task_manager(None)
        known = set(tm.all_tasks)
        bad = [n for n in unknown if n not in known]
        if bad:
            pool = sorted(set(TASKS) | set(SUITES) | known)
            parts = []
            for n in bad:
                close = difflib.get_close_matches(n, pool, n=5, cutoff=0.6)
                parts.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ConfigError(f"unknown task {'; '.join(parts)}; fix: use a suite ({', '.join(SUITES)}), one of "
                              f"domlora's tasks ({', '.join(TASKS)}), or any lm-eval task name "
                              "(`lm_eval ls tasks` lists them)")
    return names


def task_spec(name: str) -> TaskSpec:
    """domlora's spec for a task; lm-eval tasks without one run with lm-eval's defaults, no chat template."""
    return TASKS.get(name) or TaskSpec(name, name, "lm-eval's own task configuration (no chat template)",
                                       headline="", chat_template=False)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def check_adapter_dir(adapter: str | Path) -> Path:
    """Fail early on a missing, empty or corrupt adapter folder.

    Raises:
        ModelError: the message names the problem and the fix.
    """
    p = Path(adapter)
    if not p.exists():
        raise ModelError(f"adapter folder {p} does not exist; fix: pass the `adapter/` folder the train stage "
                         "wrote (runs/<cell>/adapter), or leave --adapter out to evaluate the base model")
    if not p.is_dir():
        raise ModelError(f"adapter {p} is a file, not a folder; fix: pass the folder that holds adapter_config.json")
    files = {f.name for f in p.iterdir()}
    if not files:
        raise ModelError(f"adapter folder {p} is empty (an interrupted training run?); fix: rerun the train stage")
    cfg = p / "adapter_config.json"
    if cfg.is_file():
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{cfg} is corrupt ({exc}); fix: rerun the train stage for this cell") from None
        weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if n in files]
        if not weights:
            raise ModelError(f"adapter folder {p} has adapter_config.json but no adapter_model.safetensors/.bin; "
                             "fix: rerun the train stage for this cell")
        if weights[0].endswith(".safetensors"):
            try:
                from safetensors import safe_open

                with safe_open(str(p / weights[0]), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # truncated or not a safetensors file
                raise ModelError(f"{p / weights[0]} is corrupt ({str(exc).splitlines()[0][:120]}); fix: rerun the "
                                 "train stage for this cell") from None
    elif not any(n.endswith((".safetensors", ".bin", ".json")) for n in files):
        raise ModelError(f"{p} holds no adapter files (adapter_config.json, *.safetensors); fix: pass the folder "
                         "the train stage wrote")
    return p


def adapter_fingerprint(adapter: Path | None) -> str | None:
    """sha256 over the adapter folder's files (names and bytes), so a retrained adapter is re-evaluated."""
    if adapter is None:
        return None
    h = hashlib.sha256()
    for f in sorted(adapter.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            h.update(str(f.relative_to(adapter)).encode())
            file_sha256(f, h)
    return h.hexdigest()[:16]


def _validate_settings(limit, batch_size, max_gen_toks) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer (examples per task), got {limit!r}")
    if max_gen_toks is not None and (not isinstance(max_gen_toks, int) or max_gen_toks < 1):
        raise ConfigError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            return
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")


def resolve_batch_size(batch_size: int | str, device: str) -> int | str:
    """`auto` on CPU -> CPU_BATCH_SIZE; on GPU lm-eval's own detection; numbers as they are."""
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            return batch_size if device.startswith(("cuda", "xpu", "npu", "hpu", "mps")) else CPU_BATCH_SIZE
        return int(batch_size)
    return int(batch_size)


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------

def _adapter_base(adapter: Path) -> str | None:
    for name, key in (("domlora_adapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((adapter / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def load_model_for_eval(model: str, adapter: Path | None, *, dtype: str = "auto", device: str | None = None,
                        cache_dir=None, merge: bool = True):
    """Base model (+ adapter of any variant, via `domlora.adapters.load_for_eval`) ready for evaluation.

    LoRA-type adapters are merged into the base weights (the same function, faster decoding);
    a variant that cannot merge is evaluated unmerged.

    Raises:
        ModelError: model or adapter cannot be loaded, or the adapter was trained for another base.
    """
    from .adapters import load_for_eval

    loaded = load_for_eval(model, adapter, dtype=dtype, device=device, cache_dir=cache_dir, merge=False)
    m = loaded.model
    if merge and hasattr(m, "merge_and_unload") and hasattr(m, "peft_config"):
        try:
            loaded.model = m.merge_and_unload()
            logger.info("merged the adapter into the base weights for evaluation")
        except Exception as exc:  # some variants cannot merge; evaluate them unmerged
            logger.info("evaluating the adapter unmerged (%s)", str(exc).splitlines()[0][:120])
    loaded.model.eval()
    return loaded


_GREEDY_KEYS = {"attention_mask", "do_sample", "temperature", "top_p", "top_k"}


def greedy_generate(model, input_ids, attention_mask, *, max_new_tokens: int, stop: Sequence[str] = (),
                    tokenizer=None, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0):
    """Greedy decoding that drops each row from the batch as soon as it is finished.

    `model.generate` keeps computing finished rows until the longest one ends; on a CPU a decode
    step costs roughly a fixed part plus a part per row, so with answers of uneven length most of
    a batch's work goes to rows that are already done. Here a row leaves the batch (and the KV
    cache) when it emits an EOS id or a `stop` string appears in its last tokens (lm-eval's rule).
    The tokens are what `generate(do_sample=False)` gives; the output has generate's layout:
    [batch, prompt + max_new_tokens], padded with `pad_token_id` after each row's end.
    """
    import torch
    from transformers import DynamicCache

    b, t = input_ids.shape
    out = torch.full((b, t + max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    out[:, :t] = input_ids
    mask = attention_mask.to(input_ids.device).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    stops = [s for s in stop if s] if tokenizer else []
    # tokens to decode so the longest stop string fits in the tail (+2 for merges at its edges)
    lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in stops), default=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :]
        active = torch.arange(b, device=input_ids.device)
        next_pos = pos[:, -1] + 1
        for step in range(max_new_tokens):
            tok = logits.argmax(-1)
            out[active, t + step] = tok
            done = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
            if stops:
                for j, row in enumerate(active.tolist()):
                    if done[j]:
                        continue
                    tail = tokenizer.decode(out[row, max(t, t + step + 1 - lookback):t + step + 1].tolist())
                    if any(s in tail for s in stops):
                        done[j] = True
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
    return out


def _make_lm(loaded, *, batch_size: int | str, show_progress: bool):
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            # greedy requests (all of ours) go through the shrinking-batch loop; anything else to HF
            greedy = (set(generation_kwargs) <= _GREEDY_KEYS and not generation_kwargs.get("do_sample")
                      and not generation_kwargs.get("temperature"))
            if self.backend != "causal" or not greedy:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            eos = self.model.generation_config.eos_token_id if getattr(self.model, "generation_config", None) else None
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if self.tokenizer.eos_token_id is not None:
                eos.append(self.tokenizer.eos_token_id)
            mask = generation_kwargs.get("attention_mask")
            return greedy_generate(self.model, context, context.new_ones(context.shape) if mask is None else mask,
                                   max_new_tokens=max_length - context.shape[1], stop=stop, tokenizer=self.tokenizer,
                                   eos_token_ids=eos, pad_token_id=self.tokenizer.pad_token_id or 0)

        # lm-eval shows a tqdm bar per request type; follow show_progress instead
        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not show_progress)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not show_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not show_progress)

    cfg = loaded.model.config
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return _HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_batch_size=64,
                 max_length=min(int(max_pos), MAX_LENGTH),
                 # Qwen3-style templates default to "thinking" mode; the paper decodes answers greedily
                 chat_template_args={"enable_thinking": False})


# ------------------------------------------------------------------------------------------
# one lm-eval task
# ------------------------------------------------------------------------------------------

def run_lm_eval(lm, task_manager, task: str, *, limit: int | None, chat_template: bool, gen_kwargs: dict,
                allow_unsafe_code: bool, seed: int = 1234) -> dict:
    """One task or group through `lm_eval.evaluator.evaluate`, set up as `simple_evaluate` does it.

    (`simple_evaluate` also gathers environment information by running `collect_env`
    subprocesses, ~10 s per call on a busy 2-core machine; eval.json keeps its own `run_info`.)
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(0)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = task_manager.load([task])
    for obj in loaded["tasks"].values():
        if obj.get_config("output_type") == "generate_until" and gen_kwargs:
            obj.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        if obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=seed)
    return lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                            apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                            confirm_run_unsafe_code=allow_unsafe_code)


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------

def _metric_name(metric: str, filt: str, single_filter: bool) -> str:
    if filt == "none" or single_filter:
        return metric
    return f"{metric}_{filt}".replace("-", "_")


def _stderr(v) -> float | None:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _leaf_n(res: dict, name: str) -> int:
    subs = res.get("group_subtasks", {}).get(name)
    if subs:
        return sum(_leaf_n(res, s) for s in subs)
    ns = res.get("n-samples", {}).get(name, {})
    return int(ns.get("effective", ns.get("original", 0)) or 0)


def _metrics_of(entry: dict, n: int) -> dict[str, dict]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, ...} -> {"acc": {value, stderr, n}}."""
    pairs = [k.split(",", 1) for k in entry if "," in k]
    by_metric: dict[str, set] = {}
    for m, f in pairs:
        if not m.endswith("_stderr"):
            by_metric.setdefault(m, set()).add(f)
    out = {}
    for m, filters in by_metric.items():
        for f in sorted(filters):
            v = entry.get(f"{m},{f}")
            if not isinstance(v, (int, float)):
                continue
            out[_metric_name(m, f, len(filters) == 1)] = {"value": float(v),
                                                          "stderr": _stderr(entry.get(f"{m}_stderr,{f}")), "n": n}
    return out


def summarize_lm_eval(res: dict, name: str) -> dict:
    """The part of one lm-eval result that eval.json keeps for task/group `name`."""
    entry = (res.get("groups") or {}).get(name) or res["results"].get(name) or {}
    n = _leaf_n(res, name)
    out: dict[str, Any] = {"n": n, "metrics": _metrics_of(entry, n)}
    subs = res.get("group_subtasks", {}).get(name)
    if subs:
        leaves = {}
        for s in subs:
            e = res["results"].get(s, {})
            leaves[s] = {k: v["value"] for k, v in _metrics_of(e, _leaf_n(res, s)).items()}
        out["subtasks"] = leaves
    shots = res.get("n-shot", {})
    if name in shots:
        out["num_fewshot"] = shots[name]
    if name in res.get("versions", {}):
        out["version"] = res["versions"][name]
    return out


def flat_metrics(doc: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} over successful tasks (DVC `metrics`)."""
    out = {}
    for t, rec in doc.get("tasks", {}).items():
        if rec.get("status") == "success":
            for m, v in rec.get("metrics", {}).items():
                if v.get("value") is not None:
                    out[f"{t}/{m}"] = v["value"]
    return out


def _column_value(doc: dict, column: str) -> float | None:
    task, metric = PAPER_COLUMNS[column]
    rec = doc.get("tasks", {}).get(task, {})
    v = rec.get("metrics", {}).get(metric, {}).get("value") if rec.get("status") == "success" else None
    if v is None:
        return None
    return 10.0 * v if column == "MT-Bench" else 100.0 * v


def paper_columns(doc: dict, table: int) -> dict[str, float | None]:
    """Our numbers in a paper table's columns (percent; MT-Bench x10, as the paper prints it)."""
    if table not in PAPER_TABLES:
        raise ConfigError(f"the paper has comparison tables 1 and 2, not {table!r}")
    return {c: _column_value(doc, c) for c in PAPER_TABLES[table]["columns"]}


def paper_average(values: Mapping[str, float | None]) -> float | None:
    """Mean over the columns (MT-Bench already x10); None if any is missing."""
    vals = list(values.values())
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def _backbone_key(backbone: str) -> str:
    k = "".join(ch for ch in backbone.lower() if ch.isalnum())
    if "qwen" in k:
        return "Qwen3-8B"
    if "llama" in k:
        return "LLaMA-3.1-8B"
    raise ConfigError(f"unknown backbone {backbone!r}; the paper's tables cover Qwen3-8B and LLaMA-3.1-8B(-Instruct)")


def compare_with_paper(results: Mapping, *, table: int, backbone: str) -> dict:
    """Put our numbers beside the paper's Table 1 or 2 for one backbone.

    Args:
        results: one eval.json document, or {label: eval.json document} (e.g. per method).
        table: 1 (instruction tuning) or 2 (math, code, chat).
        backbone: `Qwen3-8B` / `qwen3_8b` / `Qwen/Qwen3-8B`, or `LLaMA-3.1-8B` / `llama31_8b` / ...

    Returns:
        {"table", "backbone", "columns", "rows": [{"source", "method", "params", <columns>, "Avg."}],
         "markdown"}; our rows have None where a task is missing (and then no average).
    """
    bb = _backbone_key(backbone)
    spec = PAPER_TABLES.get(table)
    if spec is None:
        raise ConfigError(f"the paper has comparison tables 1 and 2, not {table!r}")
    cols = spec["columns"]
    rows = []
    for method, (params, vals, avg) in spec["rows"][bb].items():
        rows.append({"source": "paper", "method": method, "params": params, **dict(zip(cols, vals)), "Avg.": avg})
    docs = {"ours": results} if "tasks" in results else dict(results)
    for label, doc in docs.items():
        ours = paper_columns(doc, table)
        avg = paper_average(ours)
        rows.append({"source": "ours", "method": str(label), "params": doc.get("trainable_params"), **ours,
                     "Avg.": None if avg is None else round(avg, 2)})

    def fmt(v):
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = ["Source", "Method", "Params", *cols, "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k in ["source", "method", "params", *cols, "Avg."]) + " |")
    return {"table": table, "backbone": bb, "columns": cols, "rows": rows, "markdown": "\n".join(lines)}


# ------------------------------------------------------------------------------------------
# config hashes and resume
# ------------------------------------------------------------------------------------------

def _files_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        file_sha256(p, h)
    return h.hexdigest()[:16]


def _task_files(spec: TaskSpec) -> list[Path]:
    """Our YAML/utils files that define a task (empty for lm-eval's own tasks: its version pins them)."""
    files = [TASKS_DIR / "scoring.py"]
    for folder in ("embedded", "code", "instruct"):
        d = TASKS_DIR / folder
        names = [p for p in d.iterdir() if p.is_file()]
        if any(p.suffix == ".yaml" and p.stem == spec.lm_eval for p in names):
            return files + [p for p in names if p.suffix in (".yaml", ".py") or p.name.startswith("_")]
    if spec.name == "mt_bench":
        return files + [TASKS_DIR / "mt_bench" / "judge_prompts.json"]
    return []


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover
        return "unknown"


def task_config_hash(spec: TaskSpec, *, limit, max_gen_toks, data_file: Path | None, extra: dict | None = None) -> str:
    """Hash of everything that defines a task's result besides the model: protocol, task files, data, settings."""
    doc = {"spec": dataclasses.asdict(spec), "limit": limit, "max_gen_toks": max_gen_toks,
           "lm_eval": _lm_eval_version(), "files": _files_digest(_task_files(spec)) if _task_files(spec) else None,
           "data": file_sha256(data_file)[:16] if data_file else None, **(extra or {})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_key(model: str, adapter_fp: str | None, dtype: str) -> str:
    doc = {"model": model, "adapter": adapter_fp, "dtype": dtype, "schema": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _read_previous(out: Path, run_key: str) -> dict:
    if not out.is_file():
        return {}
    try:
        prev = read_json(out)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); evaluating every task again", out, exc)
        return {}
    if not isinstance(prev, dict) or prev.get("run_key") != run_key:
        logger.warning("%s was written for another model, adapter or dtype; evaluating every task again", out)
        return {}
    return prev.get("tasks", {}) or {}


# ------------------------------------------------------------------------------------------
# MT-Bench
# ------------------------------------------------------------------------------------------

def _mt_bench_source(data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for cand in (data_dir / "mt_bench" / "question.jsonl", data_dir / "mt_bench" / "question.json",
                 data_dir / "mt_bench.jsonl"):
        if cand.is_file():
            return cand
    return None


def generate_mt_bench_answers(lm, questions, *, max_gen_toks: int = 1024) -> dict[str, list[str]]:
    """Greedy two-turn answers: turn 1 for every question in one batched pass, then turn 2."""
    from lm_eval.api.instance import Instance

    gen = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0}
    answers: dict[str, list[str]] = {q.question_id: [] for q in questions}
    for turn in (0, 1):
        reqs = []
        for q in questions:
            msgs = []
            for t in range(turn + 1):
                msgs.append({"role": "user", "content": q.turns[t]})
                if t < turn:
                    msgs.append({"role": "assistant", "content": answers[q.question_id][t]})
            ctx = lm.apply_chat_template(msgs)
            reqs.append(Instance(request_type="generate_until", doc={}, arguments=(ctx, dict(gen)), idx=0))
        outs = lm.generate_until(reqs)
        for q, text in zip(questions, outs):
            answers[q.question_id].append(text.strip())
    return answers


def _run_mt_bench(lm, *, judge: JudgeConfig, data_dir: Path | None, limit: int | None, max_gen_toks: int | None,
                  cache_path: Path, gen_key: str, show_progress: bool) -> dict:
    from .judge import grade_mt_bench, load_mt_bench

    questions = load_mt_bench(_mt_bench_source(data_dir))
    if limit is not None:
        questions = questions[:limit]
    cache = {}
    if cache_path.is_file():
        try:
            cache = read_json(cache_path)
        except (OSError, ValueError):
            cache = {}
    if cache.get("gen_key") == gen_key and all(q.question_id in cache.get("answers", {}) for q in questions):
        answers = cache["answers"]
        logger.info("reusing %d MT-Bench answers from %s", len(questions), cache_path)
    else:
        answers = generate_mt_bench_answers(lm, questions, max_gen_toks=max_gen_toks or 1024)
        write_json(cache_path, {"gen_key": gen_key, "answers": answers})
    scores = grade_mt_bench(judge, questions, answers, show_progress=show_progress)
    write_json(cache_path, {"gen_key": gen_key, "answers": answers, "judge": judge.describe(),
                        "judgments": [dataclasses.asdict(j) for j in scores.judgments]})
    n = scores.n
    metrics = {"score": {"value": scores.score, "stderr": scores.stderr, "n": n}}
    if scores.score_turn1 is not None:
        metrics["score_turn1"] = {"value": scores.score_turn1, "stderr": None, "n": len(questions)}
    if scores.score_turn2 is not None:
        metrics["score_turn2"] = {"value": scores.score_turn2, "stderr": None, "n": len(questions)}
    return {"n": len(questions), "metrics": metrics, "n_unrated": scores.n_unrated, "judge": judge.describe(),
            "answers_file": cache_path.name}


# ------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------

def _run_info() -> dict:
    info = {"domlora": __version__, "lm_eval": _lm_eval_version()}
    for pkg in ("torch", "transformers", "peft"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # pragma: no cover
            pass
    return info


def _overall(tasks: dict) -> str:
    states = [r.get("status") for r in tasks.values()]
    if states and all(s == "success" for s in states):
        return "success"
    return "partial" if any(s == "success" for s in states) else "failed"


def evaluate(*, model: str, adapter: str | Path | None, tasks: list[str] | str, out: str | Path,
             data_dir: str | Path | None = None, limit: int | None = None, batch_size: int | str = "auto",
             max_gen_toks: int | None = None, allow_code_exec: bool = False, judge: JudgeConfig | None = None,
             cache_dir=None, show_progress: bool = False, on_result: Callable[[str, dict], None] | None = None,
             dtype: str = "auto", device: str | None = None, merge_adapter: bool = True,
             num_threads: int | None = None) -> dict:
    """Evaluate `model` (+ `adapter`) on `tasks`; write and return the eval.json document.

    Args:
        model: `embedded`, a hub id or a checkpoint folder.
        adapter: adapter folder from the train stage, or None for the base model.
        tasks: suite names (`SUITES`) and/or task names, as a list or a comma string.
        out: the eval.json path (rewritten atomically after each task).
        data_dir: folder with `<dataset>/eval.jsonl` for the embedded tasks (and `mt_bench/question.jsonl`).
        limit: evaluate only the first N examples of each task (smoke runs; not paper numbers).
        batch_size: examples per forward pass; `auto` = lm-eval's detection on GPU, CPU_BATCH_SIZE on CPU.
        max_gen_toks: cap on generated tokens for every generative task (default: each task's own).
        allow_code_exec: run generated code (HumanEval) in the sandbox; HF_ALLOW_CODE_EVAL=1 also allows it.
        judge: MT-Bench judge; None = from the environment (`JudgeConfig.from_env`), else the task is skipped.
        cache_dir: where the embedded model's converted checkpoint lives.
        show_progress: progress bars.
        on_result: called as on_result(task, record) after each task (e.g. to log to MLflow).
        dtype, device: model loading (see `domlora.models.load_model`).
        merge_adapter: merge LoRA-type adapters into the weights before evaluating (faster, same function).
        num_threads: torch CPU threads while evaluating (restored afterwards); None leaves torch's setting.
            On a CPU shared with other jobs, 1 is much faster for decoding: with more threads every
            small matmul waits for all of them to be scheduled.

    Returns:
        The eval.json document: {"status", "model", "adapter", "tasks": {name: record}, "metrics", ...}.

    Raises:
        ConfigError / DataError / ModelError: bad input, before any evaluation starts.
    """
    from .sandbox import code_exec_allowed

    t_start = time.perf_counter()
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else None
    _validate_settings(limit, batch_size, max_gen_toks)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
    # 1. names (the full lm-eval index is built only when a name is not domlora's own)
    names = expand_tasks(tasks)
    tm = None if all(n in SELF_CONTAINED for n in names) else _full_task_manager(data_dir)
    names = resolve_tasks(names, task_manager=tm)
    specs = {n: task_spec(n) for n in names}
    # 2. adapter and local data, before the model is loaded
    adapter_path = check_adapter_dir(adapter) if adapter is not None else None
    data_files: dict[str, Path] = {}
    for n, s in specs.items():
        if s.local_data:
            from .eval_tasks.scoring import LOCAL_FIELDS, read_eval_rows, resolve_eval_file

            f = resolve_eval_file(data_dir, s.local_data)
            read_eval_rows(f, LOCAL_FIELDS.get(s.local_data, ()))
            data_files[n] = f
    exec_ok = code_exec_allowed(allow_code_exec)
    judge_cfg = judge if judge is not None else JudgeConfig.from_env()
    # 3. resume
    run_key = _run_key(model, adapter_fingerprint(adapter_path), dtype)
    previous = _read_previous(out, run_key)
    hashes = {}
    for n, s in specs.items():
        extra = {"judge": judge_cfg.describe()["model"]} if n == "mt_bench" and judge_cfg else None
        hashes[n] = task_config_hash(s, limit=limit, max_gen_toks=max_gen_toks, data_file=data_files.get(n),
                                     extra=extra)
    records: dict[str, dict] = {}
    for n in names:
        rec = previous.get(n)
        if rec and rec.get("status") == "success" and rec.get("config_hash") == hashes[n]:
            records[n] = rec
    todo = [n for n in names if n not in records]
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "status": "running", "model": model,
        "adapter": str(adapter_path) if adapter_path else None,
        "adapter_base": _adapter_base(adapter_path) if adapter_path else None, "run_key": run_key,
        "settings": {"limit": limit, "batch_size": batch_size, "max_gen_toks": max_gen_toks, "dtype": dtype,
                     "code_exec": exec_ok, "decoding": "greedy (temperature 0)"},
        "lm_eval_version": _lm_eval_version(), "run_info": _run_info(), "tasks": records, "metrics": {},
    }
    if records:
        logger.info("reusing %d task result(s) from %s: %s", len(records), out, ", ".join(records))

    def save():
        ordered = {n: doc["tasks"][n] for n in names if n in doc["tasks"]}
        doc["tasks"] = ordered
        doc["metrics"] = flat_metrics(doc)
        avgs = {}
        for t in (1, 2):
            a = paper_average(paper_columns(doc, t))
            if a is not None:
                avgs[f"table{t}"] = round(a, 3)
        doc["paper_averages"] = avgs
        doc["wall_s"] = round(time.perf_counter() - t_start, 2)
        doc["status"] = _overall(doc["tasks"]) if len(doc["tasks"]) == len(names) else "running"
        write_json(out, doc)

    if not todo:
        save()
        return doc
    # 4. skip what cannot run, before loading the model
    for n in list(todo):
        s = specs[n]
        reason = None
        if s.code_exec and not exec_ok:
            reason = ("runs model-generated code, which is not allowed; fix: pass --allow-code-exec (or set "
                      "HF_ALLOW_CODE_EVAL=1) to run it in the sandbox")
        elif n == "mt_bench" and judge_cfg is None:
            reason = why_unconfigured()
        if reason:
            doc["tasks"][n] = {"status": "skipped", "reason": reason, "config_hash": hashes[n],
                               "protocol": s.protocol}
            todo.remove(n)
            logger.warning("%s skipped: %s", n, reason)
            if on_result:
                on_result(n, doc["tasks"][n])
    if not todo:
        save()
        return doc
    # 5. model, then the tasks one at a time
    with _torch_threads(num_threads):
        import torch

        loaded = load_model_for_eval(model, adapter_path, dtype=dtype, device=device, cache_dir=cache_dir,
                                     merge=merge_adapter)
        dev = str(next(loaded.model.parameters()).device)
        bs = resolve_batch_size(batch_size, dev)
        doc["settings"].update({"device": dev, "batch_size_used": bs, "threads": torch.get_num_threads()})
        lm = _make_lm(loaded, batch_size=bs, show_progress=show_progress)
        if tm is None:
            tm = _local_task_manager(data_dir)
        gen_kwargs = {"do_sample": False, "temperature": 0.0}
        if max_gen_toks is not None:
            gen_kwargs["max_gen_toks"] = max_gen_toks
        for n in todo:
            rec = _run_task(n, specs[n], lm=lm, tm=tm, config_hash=hashes[n], gen_kwargs=gen_kwargs, limit=limit,
                            max_gen_toks=max_gen_toks, exec_ok=exec_ok, judge=judge_cfg, data_dir=data_dir,
                            mt_bench_cache=out.parent / f"{out.stem}.mt_bench.json", run_key=run_key,
                            show_progress=show_progress)
            doc["tasks"][n] = rec
            save()
            if on_result:
                on_result(n, rec)
    save()
    return doc


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(prev)


def _run_task(name: str, spec: TaskSpec, *, lm, tm, config_hash: str, gen_kwargs: dict, limit, max_gen_toks,
              exec_ok: bool, judge: JudgeConfig | None, data_dir, mt_bench_cache: Path, run_key: str,
              show_progress: bool) -> dict:
    """Evaluate one task; any error becomes a `failed` record (one failing task never loses the others)."""
    t0 = time.perf_counter()
    logger.info("evaluating %s (%s)", name, spec.protocol)
    rec: dict[str, Any] = {"config_hash": config_hash, "protocol": spec.protocol, "headline": spec.headline or None}
    try:
        if name == "mt_bench":
            gen_key = hashlib.sha256(f"{run_key}:{config_hash}:{max_gen_toks}".encode()).hexdigest()[:16]
            body = _run_mt_bench(lm, judge=judge, data_dir=data_dir, limit=limit, max_gen_toks=max_gen_toks,
                                 cache_path=mt_bench_cache, gen_key=gen_key, show_progress=show_progress)
        else:
            res = run_lm_eval(lm, tm, spec.lm_eval, limit=limit, chat_template=spec.chat_template,
                              gen_kwargs=gen_kwargs, allow_unsafe_code=exec_ok and spec.code_exec)
            body = summarize_lm_eval(res, spec.lm_eval)
            if not body["metrics"]:
                raise DomloraError(f"lm-eval returned no metrics for {spec.lm_eval}")
        wall = time.perf_counter() - t0
        rec.update({"status": "success", **body, "wall_s": round(wall, 2),
                    "examples_per_s": round(body["n"] / wall, 3) if wall > 0 and body.get("n") else None})
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        if judge is not None and judge.api_key:
            msg = msg.replace(judge.api_key, "***")
        if "OfflineModeIsEnabled" in msg or "Couldn't reach" in msg:
            msg += ("; fix: this task reads its dataset from the Hugging Face hub: run it once with network "
                    "(HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) to cache the data, or use the embedded suite offline")
        rec.update({"status": "failed", "error": f"{type(exc).__name__}: {msg}",
                    "wall_s": round(time.perf_counter() - t0, 2)})
        logger.error("%s failed: %s", name, rec["error"])
        if not isinstance(exc, (DomloraError, JudgeError)):
            logger.debug("traceback", exc_info=True)
    return rec


def describe_tasks() -> str:
    """A plain-text listing of the suites and domlora's tasks with their protocols."""
    lines = ["suites:"]
    lines += [f"  {k}: {', '.join(v)}" for k, v in SUITES.items()]
    lines.append("tasks:")
    lines += [f"  {t.name}: {t.protocol}" for t in TASKS.values()]
    lines.append("(any other lm-eval task name also works, with lm-eval's own configuration)")
    return "\n".join(lines)

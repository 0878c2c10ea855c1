"""Evaluate a base model, or base + adapter, on lm-eval tasks and MT-Bench; write eval.json.

Each task runs in its own lm-eval evaluation (`run_lm_eval`) over one `HFLM` wrapping the loaded
model, so one failing task never loses the others, and eval.json is rewritten (atomically)
after every task. A rerun with the same model, adapter and settings evaluates only the tasks
that are missing, failed or skipped, or whose configuration changed.

Protocols (see `TASKS` and docs/evaluate.md): every task decodes greedily (the paper: temperature
0 for every benchmark) under the model's chat template and extracts the answer; the `instruct`
suite answers the multiple-choice benchmarks (MMLU, CommonsenseQA, TruthfulQA, LogiQA) by
generation and reads the answer letter, as the paper does (`instruct_loglik` compares the options'
log-likelihoods instead). Code is executed only when allowed (`allow_code_exec=True` or
HF_ALLOW_CODE_EVAL=1), in `domlora.evaluate.sandbox`. With `stand_in_data`, the lm-eval tasks read
a few synthetic rows instead of the benchmarks (`domlora.evaluate.stand_in`; a rehearsal, marked
as such in eval.json).

Run as: domlora evaluate --model embedded --adapter runs/X/adapter --tasks embedded --data-dir data --out eval.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domlora.adapters.variants import load_for_eval
from domlora.config import ModelSpec
from domlora.errors import ConfigError, DomloraError, ModelError
from domlora.evaluate.lm import make_lm, math_path, resolve_batch_size, run_lm_eval, summarize_lm_eval, torch_threads
from domlora.evaluate.mt_bench import JudgeConfig, JudgeError, run_mt_bench, why_unconfigured
from domlora.evaluate.nll import nll_task
from domlora.evaluate.sandbox import code_exec_allowed
from domlora.evaluate.sandbox import preflight as sandbox_preflight
from domlora.evaluate.scoring import LOCAL_FIELDS, read_eval_rows, resolve_eval_file
from domlora.evaluate.stand_in import (NOTE as STAND_IN_NOTE, STAND_IN_TASKS, check_stand_in_dir, stand_in_digest,
                                       stand_in_task_manager, stand_in_tasks)
from domlora.evaluate.tasks import (NLL_TASKS, SELF_CONTAINED, TASKS, TaskSpec, expand_tasks, full_task_manager,
                                    lm_eval_version, local_task_manager, paper_average, paper_columns, resolve_tasks,
                                    task_config_hash, task_spec)
from domlora.io import file_sha256, read_json, write_json
from domlora.provenance import run_info

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1





"""tasks that need none of lm-eval's own task library (indexing it takes ~15 s)"""


# paper column -> (task, metric); values are fractions except MT-Bench (1-10)

# The paper's Tables 1 and 2 (seed 000). MT-Bench is printed x10 there, as in the averages.



# ------------------------------------------------------------------------------------------
# task names
# ------------------------------------------------------------------------------------------











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










# ------------------------------------------------------------------------------------------
# one lm-eval task
# ------------------------------------------------------------------------------------------



# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------











def flat_metrics(doc: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} over successful tasks (DVC `metrics`)."""
    out = {}
    for t, rec in doc.get("tasks", {}).items():
        if rec.get("status") == "success":
            for m, v in rec.get("metrics", {}).items():
                if v.get("value") is not None:
                    out[f"{t}/{m}"] = v["value"]
    return out












# ------------------------------------------------------------------------------------------
# config hashes and resume
# ------------------------------------------------------------------------------------------









def _run_key(model: str, adapter_fp: str | None, dtype: str, *, stand_in: bool = False) -> str:
    doc = {"model": model, "adapter": adapter_fp, "dtype": dtype, "schema": SCHEMA_VERSION}
    if stand_in:  # stand-in and real results never share an eval.json
        doc["stand_in"] = True
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







# ------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------

def _check_stand_in_names(names: list[str]) -> None:
    local = {n for n, t in TASKS.items() if t.local_data} | {"mt_bench"}
    bad = [n for n in names if n not in STAND_IN_TASKS and n not in local]
    if bad:
        raise ConfigError(f"no stand-in for {', '.join(bad)}; stand-ins exist for {', '.join(STAND_IN_TASKS)} "
                          "(the embedded tasks and mt_bench read local data anyway); fix: drop those tasks, or "
                          "evaluate without stand_in_data")


def _quiet_custom_dataset(record: logging.LogRecord) -> bool:
    return "Custom kwargs can be passed" not in record.getMessage()


def _stand_in_mark(spec: TaskSpec, stand_in_dir: Path | None) -> dict:
    """`stand_in: true` on a task record that ran on stand-in data (the embedded tasks read their own data)."""
    if stand_in_dir is None or spec.local_data:
        return {}
    return {"stand_in": True, "protocol": f"STAND-IN DATA (not a result): {spec.protocol}"}


def _overall(tasks: dict) -> str:
    states = [r.get("status") for r in tasks.values()]
    if states and all(s == "success" for s in states):
        return "success"
    return "partial" if any(s == "success" for s in states) else "failed"


def evaluate(*, model: ModelSpec | str, adapter: str | Path | None, tasks: list[str] | str, out: str | Path,
             data_dir: str | Path | None = None, limit: int | None = None, batch_size: int | str = "auto",
             max_gen_toks: int | None = None, allow_code_exec: bool = False, judge: JudgeConfig | None = None,
             cache_dir=None, show_progress: bool = False, on_result: Callable[[str, dict], None] | None = None,
             dtype: str | None = None, device: str | None = None, merge_adapter: bool = True,
             num_threads: int | None = None, stand_in_data: str | Path | None = None) -> dict:
    """Evaluate `model` (+ `adapter`) on `tasks`; write and return the eval.json document.

    Args:
        model: a `ModelSpec` (id, dtype, trust_remote_code: loaded as every stage loads it) or its id:
            `embedded`, a hub id or a checkpoint folder.
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
        dtype: overrides the spec's dtype; device: where to run (see `domlora.models.load_model`).
        merge_adapter: merge LoRA-type adapters into the weights before evaluating (faster, same function).
        num_threads: torch CPU threads while evaluating (restored afterwards); None leaves torch's setting.
            On a CPU shared with other jobs, 1 is much faster for decoding: with more threads every
            small matmul waits for all of them to be scheduled.
        stand_in_data: a folder from `domlora.evaluate.stand_in.write_stand_in_data`: every lm-eval task
            runs as its stand-in (lm-eval's task, its data source replaced by those synthetic rows) and
            MT-Bench reads its questions from there. For rehearsing the pipeline offline; eval.json is
            marked (`stand_in_data`, and `stand_in: true` on each task) and these are never results.
            The embedded tasks read `data_dir` as usual.

    Returns:
        The eval.json document: {"status", "model", "adapter", "tasks": {name: record}, "metrics", ...}.

    Raises:
        ConfigError / DataError / ModelError: bad input, before any evaluation starts.
    """
    t_start = time.perf_counter()
    spec = ModelSpec.of(model)
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)
    model, dtype = spec.id, spec.dtype
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else None
    _validate_settings(limit, batch_size, max_gen_toks)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
    # 1. names (the full lm-eval index is built only when a name is not domlora's own)
    stand_in_dir = check_stand_in_dir(stand_in_data) if stand_in_data is not None else None
    names, tm = _task_names(tasks, data_dir=data_dir, stand_in_dir=stand_in_dir)
    specs = {n: task_spec(n) for n in names}
    # 2. adapter and local data, before the model is loaded
    adapter_path = check_adapter_dir(adapter) if adapter is not None else None
    data_files = _local_data_files(specs, data_dir)
    exec_ok = code_exec_allowed(allow_code_exec)
    judge_cfg = judge if judge is not None else JudgeConfig.from_env()
    # 3. resume
    run_key = _run_key(model, adapter_fingerprint(adapter_path), dtype, stand_in=stand_in_dir is not None)
    previous = _read_previous(out, run_key)
    stand_in_fp = stand_in_digest(stand_in_dir) if stand_in_dir is not None else None
    hashes = _task_hashes(specs, judge=judge_cfg, stand_in_fp=stand_in_fp, limit=limit, max_gen_toks=max_gen_toks,
                          data_files=data_files)
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
        "lm_eval_version": lm_eval_version(), "run_info": run_info(),
        "stand_in_data": {"path": str(stand_in_dir), "digest": stand_in_fp, "note": STAND_IN_NOTE}
        if stand_in_dir is not None else None,
        "tasks": records, "metrics": {},
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
    todo = _skip_unrunnable(todo, specs, doc, hashes=hashes, exec_ok=exec_ok, judge=judge_cfg,
                            stand_in_dir=stand_in_dir, on_result=on_result)
    if not todo:
        save()
        return doc
    # 5. stand-in tasks (their YAMLs live for this call), the model, then the tasks one at a time
    _run_todo(todo, specs, doc, save, tm=tm, spec=spec, adapter_path=adapter_path, hashes=hashes, limit=limit,
              batch_size=batch_size, max_gen_toks=max_gen_toks, exec_ok=exec_ok, judge=judge_cfg, data_dir=data_dir,
              stand_in_dir=stand_in_dir, out=out, run_key=run_key, device=device, cache_dir=cache_dir,
              merge_adapter=merge_adapter, num_threads=num_threads, show_progress=show_progress, on_result=on_result)
    save()
    return doc


def _task_names(tasks, *, data_dir, stand_in_dir) -> tuple[list[str], Any]:
    """Task names resolved (with the lm-eval task manager that knows them, when one is needed)."""
    names = expand_tasks(tasks)
    if "minerva_math" in names:
        math_path()  # its answer checker's antlr4 4.11, first on the path before lm-eval imports it
    if stand_in_dir is not None:
        _check_stand_in_names(names)
        tm = None
    else:
        tm = None if all(n in SELF_CONTAINED for n in names) else full_task_manager(data_dir)
    return resolve_tasks(names, task_manager=tm), tm


def _local_data_files(specs: dict[str, TaskSpec], data_dir) -> dict[str, Path]:
    """The eval split each embedded task reads, checked before any model loads."""
    data_files: dict[str, Path] = {}
    for n, s in specs.items():
        if s.local_data:
            f = resolve_eval_file(data_dir, s.local_data)
            read_eval_rows(f, LOCAL_FIELDS.get(s.local_data, ()))
            data_files[n] = f
    return data_files


def _task_hashes(specs: dict[str, TaskSpec], *, judge, stand_in_fp, limit, max_gen_toks,
                 data_files: dict[str, Path]) -> dict[str, str]:
    """What each task's result depends on (a stored result with the same hash is reused)."""
    hashes = {}
    for n, s in specs.items():
        extra = {"judge": judge.describe()["model"]} if n == "mt_bench" and judge else {}
        if stand_in_fp and not s.local_data:
            extra["stand_in"] = stand_in_fp
        hashes[n] = task_config_hash(s, limit=limit, max_gen_toks=max_gen_toks, data_file=data_files.get(n),
                                     extra=extra or None)
    return hashes


def _skip_unrunnable(todo: list[str], specs: dict[str, TaskSpec], doc: dict, *, hashes, exec_ok: bool, judge,
                     stand_in_dir, on_result) -> list[str]:
    """Record as skipped (with the fix) the tasks that cannot run here; returns those that can."""
    todo = list(todo)
    for n in list(todo):
        s = specs[n]
        reason = None
        if s.code_exec and not exec_ok:
            reason = ("runs model-generated code, which is not allowed; fix: pass --allow-code-exec (or set "
                      "HF_ALLOW_CODE_EVAL=1) to run it in the sandbox")
        elif n == "mt_bench" and judge is None:
            reason = why_unconfigured()
        if reason:
            doc["tasks"][n] = {"status": "skipped", "reason": reason, "config_hash": hashes[n],
                               "protocol": s.protocol, **_stand_in_mark(s, stand_in_dir)}
            todo.remove(n)
            logger.warning("%s skipped: %s", n, reason)
            if on_result:
                on_result(n, doc["tasks"][n])
    return todo


def _run_todo(todo: list[str], specs: dict[str, TaskSpec], doc: dict, save: Callable[[], None], *, tm, spec,
              adapter_path, hashes, limit, batch_size, max_gen_toks, exec_ok, judge, data_dir, stand_in_dir,
              out: Path, run_key, device, cache_dir, merge_adapter, num_threads, show_progress, on_result) -> None:
    """Load the model once and run the tasks one at a time, saving eval.json after each."""
    judge_cfg = judge
    # the sandbox must confine what generated code reads here (or broad reads were accepted), else
    # refuse before the model loads
    if any(specs[n].code_exec for n in todo):
        warning = sandbox_preflight()
        if warning:
            doc["warnings"] = [warning]
            logger.warning("%s", warning)
    with contextlib.ExitStack() as stack, torch_threads(num_threads):
        import torch

        run_specs = dict(specs)
        if stand_in_dir is not None:
            task_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="domlora-stand-in-")))
            lm_names = stand_in_tasks([n for n in todo if n in STAND_IN_TASKS], stand_in_dir, task_dir)
            for n, lm_name in lm_names.items():
                run_specs[n] = dataclasses.replace(specs[n], lm_eval=lm_name)
            tm = stand_in_task_manager(task_dir, data_dir)
            # lm-eval warns once per task that reads a `custom_dataset` (57 times for MMLU)
            task_log = logging.getLogger("lm_eval.api.task")
            task_log.addFilter(_quiet_custom_dataset)
            stack.callback(task_log.removeFilter, _quiet_custom_dataset)

        loaded = load_for_eval(spec, adapter_path, device=device, cache_dir=cache_dir, merge=merge_adapter)
        dev = str(next(loaded.model.parameters()).device)
        bs = resolve_batch_size(batch_size, dev)
        doc["settings"].update({"device": dev, "batch_size_used": bs, "threads": torch.get_num_threads()})
        lm = make_lm(loaded, batch_size=bs, show_progress=show_progress)
        if tm is None:
            tm = local_task_manager(data_dir)
        gen_kwargs = {"do_sample": False, "temperature": 0.0}
        if max_gen_toks is not None:
            gen_kwargs["max_gen_toks"] = max_gen_toks
        for n in todo:
            rec = _run_task(n, run_specs[n], lm=lm, tm=tm, config_hash=hashes[n], gen_kwargs=gen_kwargs,
                            limit=limit, max_gen_toks=max_gen_toks, exec_ok=exec_ok, judge=judge_cfg,
                            data_dir=stand_in_dir if n == "mt_bench" and stand_in_dir is not None else data_dir,
                            mt_bench_cache=out.parent / f"{out.stem}.mt_bench.json", run_key=run_key,
                            show_progress=show_progress)
            rec.update(_stand_in_mark(specs[n], stand_in_dir))
            doc["tasks"][n] = rec
            save()
            if on_result:
                on_result(n, rec)




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
            body = run_mt_bench(lm, judge=judge, data_dir=data_dir, limit=limit, max_gen_toks=max_gen_toks,
                                 cache_path=mt_bench_cache, gen_key=gen_key, show_progress=show_progress)
        elif name in NLL_TASKS:
            body = nll_task(lm, resolve_eval_file(data_dir, NLL_TASKS[name]), limit=limit)
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



"""Which tasks domlora evaluates and how: the protocol per task, suites, the paper's columns and numbers."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from domlora.errors import ConfigError
from domlora.eval_tasks import TASKS_DIR
from domlora.io import file_sha256

logger = logging.getLogger(__name__)


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
    TaskSpec("arith_nll", None, "teacher-forced negative log-likelihood of the reference answers (assistant tokens "
             "only, encoded as training encodes them), nats per token over the held-out split", "nll",
             local_data="arith"),
    TaskSpec("strings_nll", None, "teacher-forced negative log-likelihood of the reference answers (assistant tokens "
             "only, encoded as training encodes them), nats per token over the held-out split", "nll",
             local_data="strings"),
    TaskSpec("humaneval_local", "humaneval_local", "generative, greedy, chat template, the training prompt; "
             "first code block run against the problem's tests in the sandbox; pass@1", "pass@1",
             local_data="humaneval", code_exec=True),
    # ---- instruct (Table 1): the paper's protocol for the multiple-choice benchmarks (generate, read the letter)
    TaskSpec("mmlu_gen", "mmlu_gen", "generative, greedy, chat template, 0-shot: lm-eval's MMLU prompt after the "
             "instruction to answer with the letter; letter read from the reply; accuracy (exact match of the "
             "letter) over the 57 subjects weighted by size", "exact_match"),
    TaskSpec("commonsense_qa_gen", "commonsense_qa_gen", "generative, greedy, chat template, 0-shot, validation "
             "split: lm-eval's CommonsenseQA prompt after the instruction to answer with the letter A-E; accuracy "
             "(exact match of the letter)", "exact_match"),
    TaskSpec("truthfulqa_mc1_gen", "truthfulqa_mc1_gen", "generative, greedy, chat template, 0-shot: TruthfulQA "
             "MC1 options as letters (fixed per-question order), the instruction to answer with the letter; "
             "accuracy (exact match of the true answer's letter)", "exact_match"),
    TaskSpec("logiqa_gen", "logiqa_gen", "generative, greedy, chat template, 0-shot: lm-eval's LogiQA prompt after "
             "the instruction to answer with the letter A-D; accuracy (exact match of the letter)", "exact_match"),
    TaskSpec("tydiqa", "tydiqa", "TyDiQA GoldP, generative, greedy, 1-shot, chat template; exact match "
             "(and F1) averaged over 9 languages", "exact_match"),
    TaskSpec("gsm8k_cot_llama", "gsm8k_cot_llama", "GSM8K, generative, greedy, 8-shot chain of thought as "
             "chat turns; exact match of the last number (strict: 'The final answer is N')",
             "exact_match_flexible_extract"),
    # ---- instruct_loglik: the same benchmarks scored by log-likelihood (the named alternative)
    TaskSpec("mmlu", "mmlu", "log-likelihood of the answer letter A-D, 0-shot, chat template; accuracy "
             "over the 57 subjects weighted by size", "acc"),
    TaskSpec("commonsense_qa", "commonsense_qa", "log-likelihood of the answer letter A-E, 0-shot, chat "
             "template, validation split; accuracy", "acc"),
    TaskSpec("truthfulqa_mc2", "truthfulqa_mc2", "TruthfulQA MC2: normalised probability mass on the true "
             "answers (log-likelihood), 6-shot QA preamble, chat template", "acc"),
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



NLL_TASKS = {"arith_nll": "arith", "strings_nll": "strings"}
"""held-out NLL tasks domlora computes itself (`domlora.evaluate.nll`) -> the dataset whose eval split they read"""

SELF_CONTAINED = frozenset({"arith", "strings", "arith_nll", "strings_nll", "humaneval_local", "humaneval_sandbox", "humaneval_plus_sandbox",
                            "mt_bench", "commonsense_qa_gen", "truthfulqa_mc1_gen", "logiqa_gen"})
"""tasks that need none of lm-eval's own task library (indexing it takes ~15 s)"""



SUITES: dict[str, list[str]] = {
    "embedded": ["arith", "strings", "humaneval_local"],
    # Table 1 as the paper runs it: greedy generation for every benchmark, accuracy of the answer letter
    "instruct": ["mmlu_gen", "tydiqa", "commonsense_qa_gen", "truthfulqa_mc1_gen", "gsm8k_cot_llama", "logiqa_gen"],
    # the same columns with the multiple-choice benchmarks scored by log-likelihood
    "instruct_loglik": ["mmlu", "tydiqa", "commonsense_qa", "truthfulqa_mc2", "gsm8k_cot_llama", "logiqa"],
    "math": ["gsm8k_cot_llama", "minerva_math"],
    "code": ["humaneval_sandbox", "humaneval_plus_sandbox"],
    "chat": ["mt_bench"],
}



PAPER_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "MMLU": (("mmlu_gen", "exact_match"), ("mmlu", "acc")),
    "TyDiQA": (("tydiqa", "exact_match"),),
    "CQA": (("commonsense_qa_gen", "exact_match"), ("commonsense_qa", "acc")),
    "TruthfulQA": (("truthfulqa_mc1_gen", "exact_match"), ("truthfulqa_mc2", "acc")),
    "GSM8K": (("gsm8k_cot_llama", "exact_match_flexible_extract"),),
    "LogiQA": (("logiqa_gen", "exact_match"), ("logiqa", "acc")),
    "MATH": (("minerva_math", "exact_match"),),
    "HumanEval": (("humaneval_sandbox", "pass@1"),), "HumanEval+": (("humaneval_plus_sandbox", "pass@1"),),
    "MT-Bench": (("mt_bench", "score"),),
}
"""paper column -> the (task, metric) pairs that fill it, in order of preference: the paper's protocol
first (generative accuracy), then the log-likelihood alternative when that is what ran"""



# the paper's columns of each of its tables (Tables 5, 11 and 12 average these 8, not every task)
_EIGHT = ["MMLU", "TyDiQA", "CQA", "TruthfulQA", "GSM8K", "MATH", "HumanEval+", "MT-Bench"]
TABLE_COLUMNS: dict[int, list[str]] = {
    1: ["MMLU", "TyDiQA", "CQA", "TruthfulQA", "GSM8K", "LogiQA"], 3: ["MMLU", "TyDiQA", "CQA", "TruthfulQA", "GSM8K", "LogiQA"],
    2: ["GSM8K", "MATH", "HumanEval", "HumanEval+", "MT-Bench"], 4: ["GSM8K", "MATH", "HumanEval", "HumanEval+", "MT-Bench"],
    5: _EIGHT, 11: _EIGHT, 12: _EIGHT,
}


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



def local_task_manager(data_dir: Path | None):
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(data_dir)} if data_dir is not None else {}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)



def full_task_manager(data_dir: Path | None):
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
        tm = task_manager or full_task_manager(None)
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



def column_source(doc: dict, column: str) -> tuple[str, str] | None:
    """The (task, metric) that fills a paper column in an eval.json document: the first that succeeded."""
    for task, metric in PAPER_COLUMNS[column]:
        rec = doc.get("tasks", {}).get(task, {})
        if rec.get("status") == "success" and rec.get("metrics", {}).get(metric, {}).get("value") is not None:
            return task, metric
    return None



def _column_value(doc: dict, column: str) -> float | None:
    src = column_source(doc, column)
    if src is None:
        return None
    v = doc["tasks"][src[0]]["metrics"][src[1]]["value"]
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
         "markdown"}; our rows have None where a task is missing (and then no average). A column
        filled by a log-likelihood alternative (`PAPER_COLUMNS`) is named in a note under the table;
        rows from stand-in data are labelled `ours (STAND-IN DATA)` and the table starts with a warning.
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
    alternatives: dict[str, set] = {}
    stand_in = False
    for label, doc in docs.items():
        ours = paper_columns(doc, table)
        avg = paper_average(ours)
        marked = is_stand_in(doc)
        stand_in |= marked
        rows.append({"source": "ours (STAND-IN DATA)" if marked else "ours", "method": str(label),
                     "params": doc.get("trainable_params"), **ours, "Avg.": None if avg is None else round(avg, 2)})
        for c in cols:
            src = column_source(doc, c)
            if src is not None and src != PAPER_COLUMNS[c][0]:
                alternatives.setdefault(c, set()).add("/".join(src))

    def fmt(v):
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = ["Source", "Method", "Params", *cols, "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k in ["source", "method", "params", *cols, "Avg."]) + " |")
    if alternatives:
        lines += ["", "Read from the log-likelihood alternative, not the paper's generative protocol: "
                  + "; ".join(f"{c}: {', '.join(sorted(v))}" for c, v in alternatives.items()) + "."]
    if stand_in:
        lines = [f"**{STAND_IN_WARNING}**", ""] + lines
    return {"table": table, "backbone": bb, "columns": cols, "rows": rows, "markdown": "\n".join(lines)}



STAND_IN_WARNING = ("STAND-IN DATA: our rows come from synthetic stand-in rows (a rehearsal of the pipeline), "
                    "not from the benchmarks; they are not results")



def is_stand_in(doc: Mapping) -> bool:
    """Whether an eval.json document was computed on stand-in data (`evaluate(stand_in_data=...)`)."""
    return bool(doc.get("stand_in_data")) or any(
        isinstance(r, Mapping) and r.get("stand_in") for r in (doc.get("tasks") or {}).values())



def _files_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        file_sha256(p, h)
    return h.hexdigest()[:16]



def _task_files(spec: TaskSpec) -> list[Path]:
    """Our YAML/utils files that define a task (empty for lm-eval's own tasks: its version pins them)."""
    here = Path(__file__).resolve().parent
    files = [here / "scoring.py", here / "answers.py"]  # the shared scorers
    for folder in ("embedded", "code", "instruct", "mc_gen"):
        d = TASKS_DIR / folder
        names = [p for p in d.iterdir() if p.is_file()]
        if any(p.suffix == ".yaml" and p.stem == spec.lm_eval for p in names):
            if folder == "mc_gen":  # their prompts and letter extraction
                files.append(here / "multiple_choice.py")
            return files + [p for p in names if p.suffix in (".yaml", ".py") or p.name.startswith("_")]
    if spec.name == "mt_bench":
        return files + [TASKS_DIR / "mt_bench" / "judge_prompts.json"]
    return []



def lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover
        return "unknown"



def task_config_hash(spec: TaskSpec, *, limit, max_gen_toks, data_file: Path | None, extra: dict | None = None) -> str:
    """Hash of everything that defines a task's result besides the model: protocol, task files, data, settings."""
    doc = {"spec": dataclasses.asdict(spec), "limit": limit, "max_gen_toks": max_gen_toks,
           "lm_eval": lm_eval_version(), "files": _files_digest(_task_files(spec)) if _task_files(spec) else None,
           "data": file_sha256(data_file)[:16] if data_file else None, **(extra or {})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]



def describe_tasks() -> str:
    """A plain-text listing of the suites and domlora's tasks with their protocols."""
    lines = ["suites:"]
    lines += [f"  {k}: {', '.join(v)}" for k, v in SUITES.items()]
    lines.append("tasks:")
    lines += [f"  {t.name}: {t.protocol}" for t in TASKS.values()]
    lines.append("(any other lm-eval task name also works, with lm-eval's own configuration)")
    return "\n".join(lines)

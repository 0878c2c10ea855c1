"""Scoring shared by the task folders: final-answer exact match, HumanEval programs run in the sandbox.

The task folders' `utils.py` files import from here, so the YAMLs stay declarative and every
rule (answer extraction, program assembly) lives in one place with its tests.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from domlora.errors import DataError
from domlora.evaluate.answers import final_int, is_correct, normalize_answer, score_final_answer  # noqa: F401
from domlora.evaluate.sandbox import SandboxLimits, run_programs, self_test
from domlora.io import iter_jsonl

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
LOCAL_FIELDS = {
    "arith": ("question", "answer"),
    "strings": ("question", "answer"),
    "humaneval": ("messages", "task_id", "prompt", "test", "entry_point"),
}
"""keys each local eval split must carry (written by `domlora prepare`)"""

# ------------------------------------------------------------------------------------------
# local data (written by `domlora prepare`)
# ------------------------------------------------------------------------------------------


def resolve_eval_file(data_dir: str | Path | None, dataset: str) -> Path:
    """`<data_dir>/<dataset>/eval.jsonl`, or `<data_dir>/eval.jsonl` when data_dir is that dataset's folder.

    Raises:
        DataError: neither exists; the message says how to make it.
    """
    if data_dir is None:
        raise DataError(f"the `{dataset}` task reads local data but no data folder was given; fix: pass "
                        f"--data-dir DIR where DIR/{dataset}/{EVAL_FILE} was written by "
                        f"`domlora prepare --dataset {dataset} --out DIR/{dataset}`")
    root = Path(data_dir)
    cands = [root / dataset / EVAL_FILE] + ([root / EVAL_FILE] if root.name == dataset else [])
    for cand in cands:
        if cand.is_file():
            return cand
    raise DataError(f"no {EVAL_FILE} for `{dataset}` under {root} (looked for {root / dataset / EVAL_FILE}); fix: "
                    f"run `domlora prepare --dataset {dataset} --out {root / dataset}` first, or point --data-dir "
                    "at the folder that holds it")


def read_eval_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Read an eval JSONL and check every row has `required` keys."""
    rows = []
    for i, row in iter_jsonl(path, error=DataError):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{i} lacks {missing}; expected keys {list(required)}, found "
                            f"{sorted(row)}; fix: regenerate it with `domlora prepare`")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows; fix: prepare the dataset with --n-eval > 0")
    return rows


def load_local_split(dataset: str, data_dir=None, **_):
    """lm-eval `custom_dataset` body: {"test": Dataset} from the prepared eval split."""
    import datasets

    required = LOCAL_FIELDS[dataset]
    path = resolve_eval_file(data_dir, dataset)
    rows = read_eval_rows(path, required)
    # keep only what the task uses (the `messages` column has mixed shapes across datasets)
    keep = tuple(dict.fromkeys(required + ("id",)))
    rows = [{k: r[k] for k in keep if k in r} for r in rows]
    return {"test": datasets.Dataset.from_list(rows)}


# ------------------------------------------------------------------------------------------
# HumanEval: completion -> program -> sandbox
# ------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(completion: str) -> str:
    """The first fenced code block (an unclosed fence runs to the end), else the text as it is."""
    m = _FENCE.search(completion)
    if m:
        return m.group(1)
    return completion.split("```", 1)[0]


def build_program(doc: dict, completion: str) -> str:
    """prompt + completion + the problem's tests + `check(entry_point)`.

    A completion that (re)defines the entry point is placed after the prompt, so the prompt's
    imports and helper functions stay defined; otherwise it is taken as the body that continues
    the prompt's signature and docstring.
    """
    code = extract_code(completion)
    entry = doc["entry_point"]
    prompt = doc["prompt"]
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M):
        body = prompt + "\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{doc['test']}\n\ncheck({entry})\n"


def execute_programs(resps: list[list[str]], docs: list[dict], *, timeout_s: float = 10.0,
                     workers: int = 2) -> list[list[dict]]:
    """lm-eval filter body: run every completion's program in the sandbox.

    Returns, per doc, one dict per completion: {"passed": bool, "status": ..., "reason": ...}.
    """
    layers = self_test()
    logger.info("running %d generated programs in the sandbox (%s)", sum(len(r) for r in resps), ", ".join(layers))
    limits = SandboxLimits(timeout_s=timeout_s)
    flat = [(i, build_program(doc, c)) for i, (rs, doc) in enumerate(zip(resps, docs)) for c in rs]
    outs = run_programs([p for _, p in flat], limits=limits, workers=workers)
    per_doc: list[list[dict]] = [[] for _ in docs]
    for (i, _), res in zip(flat, outs):
        # reason: the exception's type and the start of its message, one line (`REASON_CHARS`); it
        # stays in lm-eval's per-sample results, written only when samples are logged (domlora does not)
        per_doc[i].append({"passed": res.passed, "status": res.status, "reason": res.reason})
    return per_doc


def score_execution(doc: dict, results: list) -> dict[str, float]:
    """pass@1 from the first completion's execution result (greedy decoding: one completion)."""
    first = results[0] if results else None
    if isinstance(first, list):
        first = first[0] if first else None
    return {"pass@1": float(bool(first and first.get("passed")))}

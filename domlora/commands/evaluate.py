"""`domlora evaluate`: lm-eval tasks and MT-Bench on a base model or base + adapter -> eval.json."""
from __future__ import annotations

import argparse
import json
import logging

from domlora.commands._args import MODEL_HELP
from domlora.errors import ConfigError
from domlora.evaluate.run import evaluate
from domlora.evaluate.tasks import describe_tasks

HELP = "evaluate a model (+ adapter) on lm-eval suites/tasks and MT-Bench; writes eval.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP + " (required)")
    p.add_argument("--adapter", default=None, help="adapter folder from the train stage (omit for the base model)")
    p.add_argument("--tasks", default=None,
                   help="suites (embedded, instruct, instruct_loglik, math, code, chat) and/or task names, "
                        "comma-separated")
    p.add_argument("--out", default=None, help="eval.json path (a rerun evaluates only missing/failed tasks)")
    p.add_argument("--data-dir", default="data", help="folder with <dataset>/eval.jsonl from `domlora prepare`")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (smoke runs only)")
    p.add_argument("--batch-size", default="auto", help="examples per forward pass, or `auto`")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens (default: per task)")
    p.add_argument("--allow-code-exec", action="store_true",
                   help="run generated code (HumanEval) in the sandbox; HF_ALLOW_CODE_EVAL=1 also allows it")
    p.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (GPU default), float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a CPU shared with other jobs); default: torch's")
    p.add_argument("--no-merge", action="store_true", help="keep the adapter unmerged (slower; same function)")
    p.add_argument("--stand-in-data", default=None, metavar="DIR",
                   help="rehearsal only: run the lm-eval tasks and MT-Bench on the synthetic stand-in rows in DIR "
                        "(written by `python -m domlora.evaluate.stand_in DIR`); eval.json is marked, never results")
    p.add_argument("--list-tasks", action="store_true", help="list suites and tasks with their protocols, then exit")


def run(a: argparse.Namespace) -> int:
    if a.list_tasks:
        print(describe_tasks())
        return 0
    if not a.model or not a.tasks or not a.out:
        raise ConfigError("--model, --tasks and --out are required (or pass --list-tasks)")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    doc = evaluate(model=a.model, adapter=a.adapter, tasks=a.tasks, out=a.out, data_dir=a.data_dir, limit=a.limit,
                   batch_size=a.batch_size, max_gen_toks=a.max_gen_toks, allow_code_exec=a.allow_code_exec,
                   dtype=a.dtype, device=a.device, merge_adapter=not a.no_merge, num_threads=a.threads,
                   stand_in_data=a.stand_in_data, show_progress=True)
    summary = {t: ({"status": r["status"], **{m: v["value"] for m, v in r.get("metrics", {}).items()}}
                   if r["status"] == "success" else {"status": r["status"], "why": r.get("error") or r.get("reason")})
               for t, r in doc["tasks"].items()}
    print(json.dumps({"status": doc["status"], "out": a.out, "tasks": summary}, indent=1))
    # skipped tasks (no judge, code execution not allowed) are not errors; failed ones are
    return 1 if any(r["status"] == "failed" for r in doc["tasks"].values()) else 0

"""Embedded tasks: the prepared eval splits of the generated datasets and of HumanEval (local JSONL)."""
from domlora.evaluate.scoring import execute_programs, load_local_split, score_execution, score_final_answer

__all__ = ["load_arith", "load_strings", "load_humaneval", "score_final_answer", "execute_humaneval",
           "score_execution"]


def load_arith(**kwargs):
    return load_local_split("arith", **kwargs)


def load_strings(**kwargs):
    return load_local_split("strings", **kwargs)


def load_humaneval(**kwargs):
    return load_local_split("humaneval", **kwargs)


def execute_humaneval(resps, docs):
    return execute_programs(resps, docs, timeout_s=10.0)

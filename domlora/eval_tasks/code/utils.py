"""HumanEval and HumanEval+ (hub datasets), scored by running each program in domlora's sandbox."""
from domlora.evaluate.scoring import execute_programs, score_execution

__all__ = ["execute_humaneval", "execute_humaneval_plus", "score_execution"]


def execute_humaneval(resps, docs):
    return execute_programs(resps, docs, timeout_s=10.0)


def execute_humaneval_plus(resps, docs):
    # HumanEval+ checks hundreds of extra inputs per problem
    return execute_programs(resps, docs, timeout_s=30.0)

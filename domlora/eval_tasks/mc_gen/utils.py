"""Generative multiple choice (the paper's protocol): lm-eval's prompts with the answer-letter instruction,
and the letter read from the reply. The rules live in domlora.evaluate.multiple_choice."""
from lm_eval.tasks.logiqa import utils_logiqa

from domlora.evaluate.multiple_choice import (
    commonsense_qa_options,
    letter_filter,
    logiqa_options,
    mmlu_options,
    render_lm_eval_prompt,
    truthfulqa_mc1_letters,
    truthfulqa_mc1_options,
    truthfulqa_mc1_prompt,
    truthfulqa_mc1_target,
    with_instruction,
)

__all__ = [
    "commonsense_qa_prompt",
    "letters_commonsense_qa",
    "letters_logiqa",
    "letters_mmlu",
    "letters_truthfulqa",
    "logiqa_prompt",
    "logiqa_target",
    "mmlu_prompt",
    "truthfulqa_mc1_prompt",
    "truthfulqa_mc1_target",
]


def mmlu_prompt(doc):
    return with_instruction(render_lm_eval_prompt("mmlu/default/_default_template_yaml", doc), "ABCD")


def commonsense_qa_prompt(doc):
    return with_instruction(render_lm_eval_prompt("commonsense_qa/default.yaml", doc), "ABCDE")


def logiqa_prompt(doc):
    return with_instruction(utils_logiqa.doc_to_text(doc), "ABCD")


def logiqa_target(doc):
    return "ABCD"[utils_logiqa.doc_to_target(doc)]


letters_mmlu = letter_filter("ABCD", mmlu_options)
letters_commonsense_qa = letter_filter("ABCDE", commonsense_qa_options)
letters_logiqa = letter_filter("ABCD", logiqa_options)
letters_truthfulqa = letter_filter(truthfulqa_mc1_letters, truthfulqa_mc1_options)

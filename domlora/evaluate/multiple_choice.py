"""Multiple-choice benchmarks answered by generation: the instruction, the prompts built on lm-eval's own,
and the answer letter taken from the reply.

The paper decodes greedily for every benchmark and reports accuracy on MMLU, CommonsenseQA,
TruthfulQA and LogiQA. The `*_gen` tasks (domlora/eval_tasks/mc_gen) do that: the user turn is
`MC_INSTRUCTION` + a blank line + lm-eval's own prompt for the log-likelihood task (options as
letters, ending in "Answer:"), the reply is generated greedily under the chat template, and
`extract_letter` reads the letter it gives. TruthfulQA's log-likelihood prompt lists no options,
so its generative prompt lists the MC1 options as letters, in a fixed order per question.
"""
from __future__ import annotations

import functools
import hashlib
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

MC_INSTRUCTION = "Answer the following multiple choice question with the letter of the correct option ({letters}) only."
"""the line put before lm-eval's prompt; `{letters}` is e.g. `A, B, C or D`"""

def option_letters(n: int) -> str:
    """`ABCD` for n = 4 (at most 26 options)."""
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple choice question needs 1-26 options, got {n}")
    return string.ascii_uppercase[:n]


def instruction(letters: str) -> str:
    """MC_INSTRUCTION for these option letters: `... (A, B, C or D) only.`"""
    spelled = letters[0] if len(letters) == 1 else ", ".join(letters[:-1]) + " or " + letters[-1]
    return MC_INSTRUCTION.format(letters=spelled)


def with_instruction(prompt: str, letters: str) -> str:
    """The generative prompt: the instruction, a blank line, then the log-likelihood task's prompt unchanged."""
    return f"{instruction(letters)}\n\n{prompt}"


# ------------------------------------------------------------------------------------------
# the letter in a reply
# ------------------------------------------------------------------------------------------

_OPEN = r"[\s\*\(\[]*"  # "(B)", "[B]", "**B**"
_END = r"(?![A-Za-z0-9])"


@functools.lru_cache(maxsize=64)
def _patterns(letters: str) -> tuple[re.Pattern, ...]:
    cls = f"[{re.escape(letters)}]"
    low = f"[{re.escape(letters.lower())}]"
    return (
        # 1. the whole reply is the letter, in either case: "B", "(b)", "C."
        re.compile(rf"^{_OPEN}([{re.escape(letters + letters.lower())}])[\.\)\]\*]*\s*$"),
        # 2. an answer statement: "The answer is (B)", "Answer: B", "correct answer would be **C**"
        re.compile(rf"(?i:\banswer)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:\-=]?{_OPEN}({cls}){_END}"),
        # 2a. ... with the letter in lower case, set off: "Correct answer: (b)", "the answer is **c**"
        re.compile(rf"(?i:\banswer)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:\-=]?\s*"
                   rf"(?:\(({low})\)|\[({low})\]|\*\*({low})\*\*)"),
        # 2b. a letter said to be the answer: "Between (A) and (C), C is correct", "(B) is the right one"
        re.compile(rf"(?<![A-Za-z0-9'])[\(\[\*]*({cls})[\)\]\*]*\s+(?:is|would\s+be)\s+(?:the\s+)?"
                   rf"(?i:correct|right|true|best|answer)\b"),
        # 3. the reply opens with the letter as a label: "B. Paris", "(B) ...", "**B**: ...", "B\n..."
        re.compile(rf"^{_OPEN}({cls})(?:[\.\):\]\*,]|\s*\n)"),
        # 4. a letter set off as a label anywhere: "I'd pick (C)", "... go with C.", "it is C"
        re.compile(rf"\(({cls})\)|\[({cls})\]|\*\*({cls})\*\*|(?<![A-Za-z0-9'])({cls})(?=[\.\):,]|\s*$)"),
        # 5. the first capital standing alone, unless it reads as the word "A" or "I" ("A cat", "I think")
        re.compile(rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])(?!(?<=[AI])\s+(?!is\b)[a-z])"),
    )


def extract_letter(text: str, letters: str = "ABCD") -> str:
    """The option letter a reply gives, or "" when it names none.

    Tried in order: the reply is just the letter ("B", "(b)"); an answer statement ("the answer
    is (B)", "Answer: B", "Correct answer: (b)"); a letter said to be correct ("Between (A) and (C),
    C is correct"); a reply that opens with the letter as a label ("B. Paris", "(B) ...");
    the first letter set off as a label anywhere ("(C)", "**C**", "C."); the first capital standing
    alone that is not the word "A"/"I" ("A cat", "I think"). Only `letters` count, so "I" is no
    answer to a four-option question; option text without its letter is read by `read_answer`.
    """
    t = (text or "").strip()
    for pat in _patterns(letters):
        m = pat.search(t)
        if m:
            return next(g for g in m.groups() if g).upper()
    return ""


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def match_option_text(text: str, options: Sequence[str]) -> int | None:
    """The index of the one option whose text the reply states (whole words, case and punctuation
    ignored), or None: no option, or two that are not one inside the other ("Paris" in "Paris, France"
    counts as the longer; "not London but Paris" names two and reads as none)."""
    reply = f" {_words(text or '')} "
    found = [(i, w) for i, w in enumerate(_words(o) for o in options) if w and f" {w} " in reply]
    kept = [(i, w) for i, w in found if not any(w != v and f" {w} " in f" {v} " for _, v in found)]
    return kept[0][0] if len(kept) == 1 else None


def read_answer(text: str, letters: str, options: Sequence[str] | None = None) -> tuple[str, str]:
    """`(letter, how)`: the letter `extract_letter` reads (`how` = "letter"); else, with the options, the
    letter of the one option whose text the reply states ("option_text"); else `("", "")`."""
    letter = extract_letter(text, letters)
    if letter:
        return letter, "letter"
    if options:
        i = match_option_text(text, options[:len(letters)])
        if i is not None:
            return letters[i], "option_text"
    return "", ""


def letter_filter(letters: str | Callable[[dict], str], options: Callable[[dict], Sequence[str]] | None = None):
    """An lm-eval `custom` filter body: each reply -> its letter (`letters`, or letters per doc), read by
    `read_answer` (the option text when the reply names no letter and `options(doc)` lists them)."""

    def apply(resps: Sequence[Sequence[str]], docs: Sequence[dict]) -> list[list[str]]:
        out = []
        for rs, doc in zip(resps, docs):
            ok = letters(doc) if callable(letters) else letters
            opts = options(doc) if options is not None else None
            out.append([read_answer(r, ok, opts)[0] for r in rs])
        return out

    return apply


# ------------------------------------------------------------------------------------------
# each generative task's letters and options
# ------------------------------------------------------------------------------------------

def mmlu_options(doc: dict) -> list[str]:
    return list(doc["choices"])


def commonsense_qa_options(doc: dict) -> list[str]:
    return list(doc["choices"]["text"])


def logiqa_options(doc: dict) -> list[str]:
    return list(doc["options"])


def truthfulqa_mc1_options(doc: dict) -> list[str]:
    """MC1's options in their displayed order (`truthfulqa_mc1_order`)."""
    choices = doc["mc1_targets"]["choices"]
    return [choices[i] for i in truthfulqa_mc1_order(doc)]


# ------------------------------------------------------------------------------------------
# lm-eval's own prompts
# ------------------------------------------------------------------------------------------

def lm_eval_task_file(relpath: str) -> Path:
    """A task file inside the installed lm-eval (`lm_eval/tasks/<relpath>`)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / relpath


@functools.lru_cache(maxsize=16)
def lm_eval_template(relpath: str, key: str = "doc_to_text") -> str:
    """A Jinja template field of one of lm-eval's task YAMLs, read from the installed package."""
    import yaml

    cfg = yaml.safe_load(lm_eval_task_file(relpath).read_text(encoding="utf-8"))
    return cfg[key]


def render_lm_eval_prompt(relpath: str, doc: dict) -> str:
    """lm-eval's `doc_to_text` for `doc`, rendered as lm-eval renders it."""
    from lm_eval.utils import apply_template

    return apply_template(lm_eval_template(relpath), doc)


# ------------------------------------------------------------------------------------------
# TruthfulQA MC1 as letters
# ------------------------------------------------------------------------------------------

def truthfulqa_mc1_order(doc: dict) -> list[int]:
    """The MC1 options' display order: fixed per question (sha256 of question and option), so the
    true answer (listed first in the dataset) is not always A."""
    q = doc["question"]
    choices = doc["mc1_targets"]["choices"]
    key = [hashlib.sha256(f"{q}\x00{c}".encode()).hexdigest() for c in choices]
    return sorted(range(len(choices)), key=lambda i: (key[i], i))


def truthfulqa_mc1_letters(doc: dict) -> str:
    return option_letters(len(doc["mc1_targets"]["choices"]))


def truthfulqa_mc1_prompt(doc: dict) -> str:
    """Instruction, the question, the MC1 options as letters (shuffled order), `Answer:`."""
    choices = doc["mc1_targets"]["choices"]
    letters = truthfulqa_mc1_letters(doc)
    lines = [f"Question: {doc['question'].strip()}"]
    lines += [f"{letters[k]}. {choices[i]}" for k, i in enumerate(truthfulqa_mc1_order(doc))]
    lines.append("Answer:")
    return with_instruction("\n".join(lines), letters)


def truthfulqa_mc1_target(doc: dict) -> str:
    """The letter of MC1's one true answer (label 1) in the displayed order."""
    true_idx = list(doc["mc1_targets"]["labels"]).index(1)
    return truthfulqa_mc1_letters(doc)[truthfulqa_mc1_order(doc).index(true_idx)]


MC_TASKS: dict[str, tuple[Callable[[dict], str], Callable[[dict], list[str]]]] = {
    "mmlu_gen": (lambda doc: "ABCD", mmlu_options),
    "commonsense_qa_gen": (lambda doc: "ABCDE", commonsense_qa_options),
    "logiqa_gen": (lambda doc: "ABCD", logiqa_options),
    "truthfulqa_mc1_gen": (truthfulqa_mc1_letters, truthfulqa_mc1_options),
}
"""domlora's generative multiple-choice tasks: their letters and options per document"""

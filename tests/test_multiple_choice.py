"""domlora.evaluate.multiple_choice: the answer letter read from replies, the instruction, TruthfulQA MC1 as letters."""
from __future__ import annotations

import pytest

from domlora.evaluate.multiple_choice import (
    extract_letter,
    instruction,
    letter_filter,
    option_letters,
    truthfulqa_mc1_order,
    truthfulqa_mc1_prompt,
    truthfulqa_mc1_target,
    with_instruction,
)

# (reply, letter read from it) for four options A-D
REPLIES = [
    ("B", "B"), ("(b)", "B"), (" C. ", "C"), ("[D]", "D"),
    ("The answer is (B).", "B"), ("Answer: C", "C"), ("answer: **D**", "D"), ("The correct answer would be A", "A"),
    ("B. Paris", "B"), ("(A) because it is round", "A"), ("**C**: red", "C"), ("B\nbecause the text says so", "B"),
    ("I think the answer is C because A is wrong", "C"),  # the answer statement beats an earlier letter
    ("A good guess is B.", "B"),  # "A" the article is not an answer
    ("I would go with D.", "D"), ("It is C", "C"), ("Option B is right", "B"), ("A is correct", "A"),
    ("A cat sat on the mat", ""), ("Paris", ""), ("The capital is Paris.", ""),
    ("E", ""), ("The correct option is (E)", ""),  # E is not an option here
    ("", ""),
]


@pytest.mark.parametrize("reply,letter", REPLIES)
def test_extract_letter(reply, letter):
    assert extract_letter(reply, "ABCD") == letter


def test_letters_depend_on_the_options():
    assert extract_letter("E", "ABCDE") == "E"
    assert extract_letter("I think it is J", "ABCDEFGHIJ") == "J"  # "I" the pronoun is skipped
    assert extract_letter("I", "ABCDEFGHIJ") == "I"
    filt = letter_filter(lambda doc: option_letters(doc["n"]))
    assert filt([["E", "(B)"], ["E"]], [{"n": 5}, {"n": 4}]) == [["E", "B"], [""]]


def test_instruction_and_prompt():
    assert instruction("ABCD") == ("Answer the following multiple choice question with the letter of the correct "
                                   "option (A, B, C or D) only.")
    assert "(A, B, C, D or E)" in instruction("ABCDE")
    assert with_instruction("Q?\nA. x\nAnswer:", "AB") == instruction("AB") + "\n\nQ?\nA. x\nAnswer:"
    with pytest.raises(ValueError):
        option_letters(27)


def test_truthfulqa_mc1_as_letters():
    docs = [{"question": f"Question number {i}?",
             "mc1_targets": {"choices": ["the true one", "false 1", "false 2", "false 3", "false 4"],
                             "labels": [1, 0, 0, 0, 0]}} for i in range(40)]
    targets = []
    for doc in docs:
        order = truthfulqa_mc1_order(doc)
        assert sorted(order) == list(range(5)) and order == truthfulqa_mc1_order(dict(doc))  # fixed per question
        prompt = truthfulqa_mc1_prompt(doc)
        letter = truthfulqa_mc1_target(doc)
        assert prompt.startswith(instruction("ABCDE") + "\n\nQuestion: " + doc["question"])
        assert f"\n{letter}. the true one\n" in prompt and prompt.endswith("\nAnswer:")
        targets.append(letter)
    # the true answer (always first in the dataset) is spread over the letters, not always A
    assert len(set(targets)) >= 4


# the misreads the old rules made, each with the letter it should read
MISREADS = [
    ("Between (A) and (C), C is correct", "C"),  # read as A (the first letter set off)
    ("Correct answer: (b)", "B"),  # read as nothing (a lower-case letter in an answer statement)
    ("the answer is **c**", "C"),
    ("(A) is wrong, (D) is the right one", "D"),
]


@pytest.mark.parametrize("reply,letter", MISREADS)
def test_misreads(reply, letter):
    assert extract_letter(reply, "ABCD") == letter


OPTIONS = ["London", "Paris", "Paris, Texas", "Berlin"]


@pytest.mark.parametrize("reply,letter,how", [
    ("The capital of France is Paris.", "B", "option_text"),  # scored 0 before: no letter
    ("paris, texas", "C", "option_text"),  # the longer option that holds the shorter
    ("Not London but Paris", "", ""),  # two options named: none
    ("Lisbon", "", ""),
    ("B. Berlin", "B", "letter"),  # a letter wins over the text
])
def test_read_answer_matches_the_option_text(reply, letter, how):
    from domlora.evaluate.multiple_choice import read_answer

    assert read_answer(reply, "ABCD", OPTIONS) == (letter, how)
    assert read_answer(reply, "ABCD") == ((letter, how) if how == "letter" else ("", ""))


def test_filters_read_the_option_text_of_each_task():
    from domlora.eval_tasks.mc_gen import utils

    mmlu = {"choices": ["red", "green", "blue", "black"]}
    cqa = {"choices": {"label": list("ABCDE"), "text": ["bank", "river", "sea", "lake", "pond"]}}
    logiqa = {"options": ["all of them", "none", "some", "two"]}
    assert utils.letters_mmlu([["It is blue."]], [mmlu]) == [["C"]]
    assert utils.letters_commonsense_qa([["a pond"]], [cqa]) == [["E"]]
    assert utils.letters_logiqa([["None."]], [logiqa]) == [["B"]]
    tqa = {"question": "Q?", "mc1_targets": {"choices": ["the true one", "false one", "wrong one"], "labels": [1, 0, 0]}}
    assert utils.letters_truthfulqa([["The true one."]], [tqa]) == [[truthfulqa_mc1_target(tqa)]]


class _FakeLM:
    """lm-eval's loglikelihood: the letter named in `prefer` for contexts ending in its key is likeliest."""

    def __init__(self, prefer):
        self.prefer, self.seen = prefer, []

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            ctx, letter = r.arguments
            self.seen.append(ctx)
            want = next((v for k, v in self.prefer.items() if ctx.endswith(k)), None)
            out.append((0.0 if letter == want else -5.0, letter == want))
        return out


def _sample(reply, target, ctx="<prompt>"):
    return {"doc": {"choices": OPTIONS}, "target": target, "arguments": [(ctx, {})], "resps": [[reply]]}


def test_audit_counts_replies_with_no_letter_and_cross_checks():
    from domlora.evaluate.mc_answers import audit_answers, constrained_context

    samples = [_sample("B", "B"), _sample("It is Paris.", "B"), _sample("I am not sure", "D", ctx="<p3>"),
               _sample("Hmm", "A", ctx="<p4>")]
    lm = _FakeLM({"The answer is ": "D", "<prompt>": "B", "<p3>": "A", "<p4>": "A"})
    out = audit_answers(lm, samples, "mmlu_gen")
    a, m = out["answers"], out["metrics"]
    assert a["read_by"] == {"letter": 1, "option_text": 1, "none": 2} and a["n"] == 4
    assert a["no_letter_examples"] == ["I am not sure", "Hmm"]
    assert m["no_letter"]["value"] == 0.5
    # the two with no letter get NoRM's constrained letter (D): right for the third, wrong for the fourth
    assert m["exact_match_constrained"]["value"] == 0.75
    assert constrained_context("<p3>", "I am not sure") == "<p3>I am not sure. \nThe answer is "
    assert constrained_context("<p>", "Maybe.") == "<p>Maybe. \nThe answer is "
    assert "<p3>I am not sure. \nThe answer is " in lm.seen
    # log-likelihood of the letter right after the prompt: B, B, A, A against B, B, D, A
    assert m["acc_loglik"]["value"] == 0.75

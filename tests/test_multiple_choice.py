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

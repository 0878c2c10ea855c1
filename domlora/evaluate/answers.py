"""Final-answer exact match: the `#### <answer>` on the last line, as the prepared data teaches (the task
folders score with it through `evaluate.scoring`; GRPO's reward and the arithmetic accuracy use it too)."""
from __future__ import annotations

import re

from domlora.data import extract_final_answer

_INT = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(ans: str) -> str:
    """Strip, collapse spaces, drop a trailing period / surrounding quotes, `$` and thousands commas in numbers."""
    s = " ".join(str(ans).strip().split())
    s = s.strip("\"'`").rstrip(".").strip()
    if s.startswith("$"):
        s = s[1:]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _flex_answer(text: str, gold: str) -> str | None:
    strict = extract_final_answer(text)
    if strict is not None:
        return strict
    if _INT.match(normalize_answer(gold)):
        nums = _NUMBER.findall(text)
        return nums[-1] if nums else None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1]
    # "Sorted: 2 5 9" / "The answer is X": keep what follows the label
    for sep in (":", " is "):
        if sep in last:
            last = last.rsplit(sep, 1)[1]
            break
    return last


_FINAL_INT = re.compile(r"^\$?\s*(-?\d[\d,]*)(?:\.0+)?\s*\$?\.?$")


def final_int(text: str) -> int | None:
    """The integer on the last `#### ...` line (`#### 1,200`, `#### $12` allowed), else None."""
    ans = extract_final_answer(text)
    m = _FINAL_INT.match(ans) if ans is not None else None
    return int(m.group(1).replace(",", "")) if m else None


def is_correct(completion: str, answer) -> bool:
    """The arithmetic and strings tasks' one rule: the final `#### ...` line equals the answer."""
    return bool(score_final_answer({"answer": str(answer)}, [completion])["exact_match"])


def score_final_answer(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the last `#### ...` line equals the answer.

    exact_match_flex: without such a line, the last number (numeric answers) or the last line
    after any "label:" / "... is" (other answers) is compared instead.
    """
    completion = results[0] if results else ""
    gold = normalize_answer(doc["answer"])
    strict = extract_final_answer(completion)
    flex = _flex_answer(completion, doc["answer"])
    return {
        "exact_match": float(strict is not None and normalize_answer(strict) == gold),
        "exact_match_flex": float(flex is not None and normalize_answer(flex) == gold),
    }

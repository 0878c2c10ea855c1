"""How the answers of a generative multiple-choice task were read, and two cross-checks of its accuracy.

The letter of a reply is read by rules (`multiple_choice.read_answer`), so the task's accuracy mixes
what the model knows with how it writes its answer: an adapter that makes the model wordier loses
points to replies with no readable letter. For every `*_gen` task domlora records, per task and cell
(eval.json, the report):

- `no_letter`: the share of replies with no letter (neither a letter nor one option's text), and a few
  of them (`answers.no_letter_examples`); `answers.read_by` counts replies read by letter and by text;
- `exact_match_constrained`: the accuracy when each reply with no letter is followed by "The answer is "
  and one token is decoded among the option letters, as the NoRM evaluator (`pixas/NoRM`,
  `evaluation/model_diverse_gen_batch.py`) reads its chain-of-thought replies; replies with a letter keep
  it. The one constrained token is the letter with the highest log-likelihood after that context;
- `acc_loglik`: the accuracy of the option letter with the highest log-likelihood right after the
  prompt (the generation prompt under the chat template, before any reply): what the model would
  answer if it had to start with a letter, a cross-check of the generative accuracy free of format.
"""
from __future__ import annotations

from collections.abc import Sequence

from domlora.evaluate.multiple_choice import MC_TASKS, read_answer

N_EXAMPLES = 3
"""replies with no letter kept per task"""
EXAMPLE_CHARS = 200
CONSTRAINED_PROMPT = "\nThe answer is "
"""what NoRM appends to a reply before it decodes the one letter"""


def constrained_context(context: str, reply: str) -> str:
    """The context of the constrained letter: the prompt, the reply, a full stop where it has none, and
    "The answer is " (as NoRM writes it)."""
    return context + reply + (" " if reply.strip().endswith(".") else ". ") + CONSTRAINED_PROMPT


def _best_letters(lm, requests: Sequence[tuple[str, str]]) -> list[str]:
    """For each (context, letters): the letter whose token(s) are likeliest after the context."""
    from lm_eval.api.instance import Instance

    flat = [(i, ctx, letter) for i, (ctx, letters) in enumerate(requests) for letter in letters]
    if not flat:
        return []
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, letter), idx=k)
            for k, (_, ctx, letter) in enumerate(flat)]
    scores = lm.loglikelihood(inst, disable_tqdm=True)
    best: dict[int, tuple[float, str]] = {}
    for (i, _, letter), (logp, _) in zip(flat, scores):
        if i not in best or logp > best[i][0]:
            best[i] = (logp, letter)
    return [best[i][1] for i in range(len(requests))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _stderr(p: float | None, n: int) -> float | None:
    if p is None or n < 2:
        return None
    return (p * (1 - p) / (n - 1)) ** 0.5


def audit_answers(lm, samples: Sequence[dict], task: str, *, loglik: bool = True) -> dict:
    """The metrics and the `answers` record of a generative MC task from lm-eval's logged samples.

    Args:
        lm: the lm-eval model the task ran on (the cross-checks ask it for log-likelihoods).
        samples: lm-eval's logged samples of every leaf task (`doc`, `target`, `arguments`, `resps`).
        task: a key of `multiple_choice.MC_TASKS` (its letters and options per document).
        loglik: also compute the constrained fallback and the log-likelihood accuracy.

    Returns:
        {"metrics": {"no_letter", "exact_match_constrained", "acc_loglik"}, "answers": {...}}
    """
    letters_of, options_of = MC_TASKS[task]
    rows = []
    for s in samples:
        doc, ctx, reply = s["doc"], s["arguments"][0][0], s["resps"][0][0]
        letters = letters_of(doc)
        letter, how = read_answer(reply, letters, options_of(doc))
        rows.append({"ctx": ctx, "reply": reply, "letters": letters, "letter": letter, "how": how,
                     "target": str(s["target"]).strip()})
    n = len(rows)
    none = [r for r in rows if not r["how"]]
    answers = {"n": n, "read_by": {"letter": sum(r["how"] == "letter" for r in rows),
                                   "option_text": sum(r["how"] == "option_text" for r in rows), "none": len(none)},
               "no_letter_examples": [r["reply"][:EXAMPLE_CHARS] for r in none[:N_EXAMPLES]]}
    metrics: dict[str, dict] = {}
    rate = len(none) / n if n else None
    metrics["no_letter"] = {"value": rate, "stderr": _stderr(rate, n), "n": n}
    if loglik and n:
        fallback = _best_letters(lm, [(constrained_context(r["ctx"], r["reply"]), r["letters"]) for r in none])
        for r, letter in zip(none, fallback):
            r["constrained"] = letter
        acc = _mean([float((r["letter"] or r.get("constrained", "")) == r["target"]) for r in rows])
        metrics["exact_match_constrained"] = {"value": acc, "stderr": _stderr(acc, n), "n": n}
        first = _best_letters(lm, [(r["ctx"], r["letters"]) for r in rows])
        acc = _mean([float(a == r["target"]) for a, r in zip(first, rows)])
        metrics["acc_loglik"] = {"value": acc, "stderr": _stderr(acc, n), "n": n}
        answers["constrained_letters"] = len(fallback)
    return {"metrics": metrics, "answers": answers}


def samples_of(res: dict) -> list[dict]:
    """Every leaf task's logged samples of one lm-eval result (a group's members pooled)."""
    return [s for rows in (res.get("samples") or {}).values() for s in rows]

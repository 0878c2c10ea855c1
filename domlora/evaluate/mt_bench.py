"""MT-Bench: the 80 two-turn questions, greedy two-turn answers, and single-answer grading (1-10) by a judge model.

The judge is any OpenAI-compatible chat-completions endpoint. Where it is and which model to
use come from the environment (`JudgeConfig.from_env`):

    DOMLORA_JUDGE_URL     (else OPENAI_BASE_URL, else https://api.openai.com/v1 when a key is set)
    DOMLORA_JUDGE_API_KEY (else OPENAI_API_KEY; optional for a local server)
    DOMLORA_JUDGE_MODEL   (else OPENAI_MODEL)

Grading follows FastChat's llm_judge "single" mode: prompts `single-v1` / `single-v1-multi-turn`,
and the reference-based `single-math-v1*` prompts for math, reasoning and coding questions
that carry reference answers; temperature 0, 2048 tokens; the rating is the `[[n]]` in the
judge's reply. Turn 1 is judged on the first answer, turn 2 on the whole conversation. The
score is the mean over all judged turns (FastChat drops replies without a rating).

The API key is held in a field excluded from repr, sent only in the Authorization header and
scrubbed from every message this module produces.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from domlora.errors import ConfigError, DataError, DomloraError
from domlora.io import read_json, write_json

logger = logging.getLogger(__name__)

MT_BENCH_HUB_ID = "HuggingFaceH4/mt_bench_prompts"
MT_BENCH_SIZE = 80
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "eval_tasks" / "mt_bench" / "judge_prompts.json"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(DomloraError):
    """The judge could not be reached or answered unusably (after retries)."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how to call it."""

    url: str
    """base URL of an OpenAI-compatible API (`.../v1`); `/chat/completions` is appended"""
    model: str
    """judge model name as the endpoint knows it (the paper used GPT-5)"""
    api_key: str | None = field(default=None, repr=False)
    """bearer token; never logged or written"""
    timeout_s: float = 120.0
    """seconds per HTTP request"""
    max_retries: int = 5
    """retries per request on connection errors, timeouts, 408/429/5xx"""
    backoff_s: float = 2.0
    """first retry delay; doubles each retry (with jitter), capped by max_backoff_s"""
    max_backoff_s: float = 60.0
    max_tokens: int = 2048
    temperature: float = 0.0
    workers: int = 4
    """judge requests in flight at once"""

    def __post_init__(self):
        parsed = urllib.parse.urlsplit(self.url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"judge URL {redact_url(self.url)!r} is not an http(s) URL; fix: set DOMLORA_JUDGE_URL "
                              "to e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        if not self.model:
            raise ConfigError("no judge model name; fix: set DOMLORA_JUDGE_MODEL (e.g. gpt-4o)")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0 or self.workers < 1:
            raise ConfigError("judge timeout_s must be > 0, max_retries >= 0, backoff_s >= 0, workers >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> JudgeConfig | None:
        """The judge the environment configures, or None when it configures none (see `why_unconfigured`)."""
        env = os.environ if environ is None else environ
        key = env.get("DOMLORA_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or None
        url = env.get("DOMLORA_JUDGE_URL") or env.get("OPENAI_BASE_URL") or (DEFAULT_OPENAI_URL if key else None)
        model = env.get("DOMLORA_JUDGE_MODEL") or env.get("OPENAI_MODEL")
        if not url or not model:
            return None
        return cls(url=url.rstrip("/"), model=model, api_key=key, **overrides)

    def describe(self) -> dict:
        """What may be recorded about the judge: URL without credentials, model, protocol. No key."""
        return {"url": redact_url(self.url), "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "protocol": "FastChat llm_judge single-answer grading (1-10)"}


def why_unconfigured(environ: Mapping[str, str] | None = None) -> str:
    """The reason `JudgeConfig.from_env` returns None (for the skipped-task record)."""
    env = os.environ if environ is None else environ
    has_url = bool(env.get("DOMLORA_JUDGE_URL") or env.get("OPENAI_BASE_URL")
                   or env.get("DOMLORA_JUDGE_API_KEY") or env.get("OPENAI_API_KEY"))
    has_model = bool(env.get("DOMLORA_JUDGE_MODEL") or env.get("OPENAI_MODEL"))
    missing = [n for n, ok in (("DOMLORA_JUDGE_URL (or an API key for api.openai.com)", has_url),
                               ("DOMLORA_JUDGE_MODEL", has_model)) if not ok]
    return ("no MT-Bench judge configured: set " + " and ".join(missing)
            + " (plus DOMLORA_JUDGE_API_KEY if the endpoint needs one) to grade MT-Bench")


def redact_url(url: str | None) -> str:
    """The URL without user:password@ and without a query string."""
    if not url:
        return ""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------------------
# questions
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] = ()


def _to_question(row: dict, where: str) -> MTBenchQuestion:
    turns = row.get("turns", row.get("prompt"))
    if not isinstance(turns, (list, tuple)) or len(turns) != 2 or not all(isinstance(t, str) for t in turns):
        raise DataError(f"{where}: an MT-Bench question needs two user turns in `turns` (FastChat question.jsonl) "
                        f"or `prompt` (HuggingFaceH4/mt_bench_prompts); found keys {sorted(row)}")
    qid = row.get("question_id", row.get("prompt_id"))
    ref = row.get("reference") or ()
    if isinstance(ref, str):
        ref = (ref,)
    return MTBenchQuestion(question_id=str(qid), category=str(row.get("category", "")), turns=(turns[0], turns[1]),
                           reference=tuple(str(r) for r in ref))


def load_mt_bench(source: str | os.PathLike | None = None) -> list[MTBenchQuestion]:
    """MT-Bench questions from a local JSON/JSONL file, or from the hub (`HuggingFaceH4/mt_bench_prompts`).

    Raises:
        DataError: missing or malformed file, or the hub copy is not available (offline, not cached).
    """
    if source is not None and Path(source).exists():
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in text.splitlines()
                                                                            if ln.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON/JSONL ({exc.msg}); fix: use FastChat's "
                            "fastchat/llm_judge/data/mt_bench/question.jsonl") from None
        where = str(path)
    else:
        hub_id = str(source) if source is not None else MT_BENCH_HUB_ID
        if source is not None and (str(source).startswith((".", "/", "~")) or str(source).endswith((".json", ".jsonl"))):
            raise DataError(f"MT-Bench question file {source} does not exist; fix: check the path")
        try:
            import datasets

            rows = list(datasets.load_dataset(hub_id, split="train"))
        except Exception as exc:  # offline, not cached, renamed ...
            raise DataError(f"cannot load MT-Bench questions from the hub ({hub_id}): {str(exc).splitlines()[0][:200]}; "
                            "fix: download it once with network, or put FastChat's question.jsonl at "
                            "<data-dir>/mt_bench/question.jsonl") from None
        where = hub_id
    questions = [_to_question(r, where) for r in rows]
    if not questions:
        raise DataError(f"{where} holds no MT-Bench questions")
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{where}: question ids repeat; every question needs its own id")
    if len(questions) != MT_BENCH_SIZE:
        logger.warning("%s holds %d MT-Bench questions (the benchmark has %d)", where, len(questions), MT_BENCH_SIZE)
    return questions


def load_judge_prompts(path: str | os.PathLike | None = None) -> dict:
    """The judge prompt document (prompts by name, reference categories, judge settings)."""
    with open(path or PROMPTS_FILE, encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------
# the endpoint
# ------------------------------------------------------------------------------------------

def chat_completion(config: JudgeConfig, messages: list[dict], *, sleep: Callable[[float], None] = time.sleep) -> str:
    """One chat completion with retries and exponential backoff.

    Raises:
        JudgeError: still failing after `config.max_retries` retries, or a non-retryable answer
            (400/401/403/404 ...). The message never contains the API key.
    """
    url = config.url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": config.model, "messages": messages, "temperature": config.temperature,
                       "max_tokens": config.max_tokens, "n": 1}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    where = redact_url(config.url)
    last = ""
    for attempt in range(config.max_retries + 1):
        if attempt:
            delay = min(config.max_backoff_s, config.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            logger.warning("judge request failed (%s); retry %d/%d in %.1f s", last, attempt, config.max_retries, delay)
            sleep(delay)
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=config.timeout_s) as resp:  # noqa: S310 (user-chosen URL)
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _scrub(exc.read(300).decode("utf-8", "replace"), config.api_key) if exc.fp else ""
            last = f"HTTP {exc.code} from {where}"
            if exc.code in _RETRY_STATUS:
                continue
            hint = {401: "the judge rejected the API key; fix: check DOMLORA_JUDGE_API_KEY",
                    403: "the judge refused access; fix: check the key's permissions",
                    404: "no such endpoint or model; fix: check DOMLORA_JUDGE_URL (it should end in /v1) and "
                         "DOMLORA_JUDGE_MODEL"}.get(exc.code, "fix: check the judge settings")
            raise JudgeError(f"{last}: {detail.strip()[:200]!r}; {hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"cannot reach {where}: {_scrub(str(reason), config.api_key)[:200]}"
            continue
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            last = f"unexpected reply from {where} (not an OpenAI chat completion)"
            continue
        if not isinstance(content, str):
            last = f"unexpected reply from {where} (no message content)"
            continue
        return content
    raise JudgeError(f"MT-Bench judge failed after {config.max_retries + 1} attempts: {last}; fix: check that "
                     f"the endpoint is up (DOMLORA_JUDGE_URL={where}), then rerun — answers already generated "
                     "are reused")


def parse_rating(text: str) -> float | None:
    """FastChat's rule: the first `[[n]]` (else `[n]`); None when absent or outside 0-10."""
    m = _ONE_SCORE.search(text) or _ONE_SCORE_BACKUP.search(text)
    if not m:
        return None
    try:
        value = float(m.group(1))
    except ValueError:
        return None
    return value if 0.0 <= value <= 10.0 and math.isfinite(value) else None


# ------------------------------------------------------------------------------------------
# grading
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgment:
    question_id: str
    turn: int
    prompt_name: str
    score: float | None
    """1-10, or None when the judge gave no rating"""
    judgment: str


def build_judge_messages(question: MTBenchQuestion, answers: Sequence[str], turn: int,
                         prompts: dict) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) for judging `turn` (1 or 2) of one answered question."""
    if turn not in (1, 2):
        raise ValueError("turn must be 1 or 2")
    ref_cats = set(prompts.get("need_reference_categories", ()))
    use_ref = question.category in ref_cats and len(question.reference) >= turn
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts["prompts"][name]
    kwargs = {}
    if use_ref:
        kwargs["ref_answer_1"] = question.reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = question.reference[1]
    if turn == 1:
        user = p["prompt_template"].format(question=question.turns[0], answer=answers[0], **kwargs)
    else:
        user = p["prompt_template"].format(question_1=question.turns[0], question_2=question.turns[1],
                                           answer_1=answers[0], answer_2=answers[1], **kwargs)
    return name, [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]


@dataclass
class MTBenchScores:
    score: float
    """mean rating over judged turns (1-10)"""
    stderr: float | None
    n: int
    """judged turns with a rating"""
    score_turn1: float | None
    score_turn2: float | None
    n_unrated: int
    judgments: list[Judgment]


def _mean_stderr(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def grade_mt_bench(config: JudgeConfig, questions: Sequence[MTBenchQuestion], answers: Mapping[str, Sequence[str]],
                   *, prompts: dict | None = None, show_progress: bool = False,
                   sleep: Callable[[float], None] = time.sleep) -> MTBenchScores:
    """Judge both turns of every answered question.

    Raises:
        JudgeError: the endpoint keeps failing (the first request that exhausts its retries stops
            the grading), or no reply carries a rating.
    """
    prompts = prompts or load_judge_prompts()
    jobs = []
    for q in questions:
        if q.question_id not in answers:
            raise DataError(f"no answers for MT-Bench question {q.question_id}")
        for turn in (1, 2):
            name, msgs = build_judge_messages(q, answers[q.question_id], turn, prompts)
            jobs.append((q.question_id, turn, name, msgs))
    logger.info("grading %d MT-Bench turns with %s at %s", len(jobs), config.model, redact_url(config.url))
    results: list[Judgment | None] = [None] * len(jobs)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="MT-Bench judge")
    with cf.ThreadPoolExecutor(max_workers=config.workers) as pool:
        futs = {pool.submit(chat_completion, config, msgs, sleep=sleep): i for i, (_, _, _, msgs) in enumerate(jobs)}
        try:
            for fut in cf.as_completed(futs):
                i = futs[fut]
                text = fut.result()
                qid, turn, name, _ = jobs[i]
                results[i] = Judgment(qid, turn, name, parse_rating(text), text)
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    judged = [j for j in results if j is not None]
    rated = [j.score for j in judged if j.score is not None]
    if not rated:
        raise JudgeError(f"the judge ({config.model}) answered {len(judged)} requests but none carried a "
                         "`[[rating]]`; fix: use a stronger judge model")
    score, stderr = _mean_stderr(rated)
    t1, _ = _mean_stderr([j.score for j in judged if j.turn == 1 and j.score is not None])
    t2, _ = _mean_stderr([j.score for j in judged if j.turn == 2 and j.score is not None])
    return MTBenchScores(score=score, stderr=stderr, n=len(rated), score_turn1=t1, score_turn2=t2,
                         n_unrated=len(judged) - len(rated), judgments=judged)


def _mt_bench_source(data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for cand in (data_dir / "mt_bench" / "question.jsonl", data_dir / "mt_bench" / "question.json",
                 data_dir / "mt_bench.jsonl"):
        if cand.is_file():
            return cand
    return None



def generate_mt_bench_answers(lm, questions, *, max_gen_toks: int = 1024) -> dict[str, list[str]]:
    """Greedy two-turn answers: turn 1 for every question in one batched pass, then turn 2."""
    from lm_eval.api.instance import Instance

    gen = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0}
    answers: dict[str, list[str]] = {q.question_id: [] for q in questions}
    for turn in (0, 1):
        reqs = []
        for q in questions:
            msgs = []
            for t in range(turn + 1):
                msgs.append({"role": "user", "content": q.turns[t]})
                if t < turn:
                    msgs.append({"role": "assistant", "content": answers[q.question_id][t]})
            ctx = lm.apply_chat_template(msgs)
            reqs.append(Instance(request_type="generate_until", doc={}, arguments=(ctx, dict(gen)), idx=0))
        outs = lm.generate_until(reqs)
        for q, text in zip(questions, outs):
            answers[q.question_id].append(text.strip())
    return answers



def run_mt_bench(lm, *, judge: JudgeConfig, data_dir: Path | None, limit: int | None, max_gen_toks: int | None,
                  cache_path: Path, gen_key: str, show_progress: bool) -> dict:

    questions = load_mt_bench(_mt_bench_source(data_dir))
    if limit is not None:
        questions = questions[:limit]
    cache = {}
    if cache_path.is_file():
        try:
            cache = read_json(cache_path)
        except (OSError, ValueError):
            cache = {}
    if cache.get("gen_key") == gen_key and all(q.question_id in cache.get("answers", {}) for q in questions):
        answers = cache["answers"]
        logger.info("reusing %d MT-Bench answers from %s", len(questions), cache_path)
    else:
        answers = generate_mt_bench_answers(lm, questions, max_gen_toks=max_gen_toks or 1024)
        write_json(cache_path, {"gen_key": gen_key, "answers": answers})
    scores = grade_mt_bench(judge, questions, answers, show_progress=show_progress)
    write_json(cache_path, {"gen_key": gen_key, "answers": answers, "judge": judge.describe(),
                        "judgments": [dataclasses.asdict(j) for j in scores.judgments]})
    n = scores.n
    metrics = {"score": {"value": scores.score, "stderr": scores.stderr, "n": n}}
    if scores.score_turn1 is not None:
        metrics["score_turn1"] = {"value": scores.score_turn1, "stderr": None, "n": len(questions)}
    if scores.score_turn2 is not None:
        metrics["score_turn2"] = {"value": scores.score_turn2, "stderr": None, "n": len(questions)}
    return {"n": len(questions), "metrics": metrics, "n_unrated": scores.n_unrated, "judge": judge.describe(),
            "answers_file": cache_path.name}

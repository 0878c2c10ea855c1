"""MT-Bench judge client: configuration from the environment, retries, grading, and the key never leaking."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from domlora.errors import ConfigError, DataError
from domlora.evaluate.mt_bench import (JudgeConfig, JudgeError, MTBenchQuestion, build_judge_messages, chat_completion,
                           grade_mt_bench, load_judge_prompts, load_mt_bench, parse_rating, redact_url,
                           why_unconfigured)

KEY = "sk-test-5e3cr3t-k3y"


class _Judge:
    """A loopback OpenAI-compatible server; `plan` lists status codes to return before succeeding."""

    def __init__(self, *, plan=(), reply="The answer is fine.\nRating: [[7]]", require_key=KEY):
        self.plan = list(plan)
        self.reply = reply
        self.require_key = require_key
        self.calls = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                code = outer.plan.pop(0) if outer.plan else 200
                if outer.require_key and self.headers.get("Authorization") != f"Bearer {outer.require_key}":
                    code = 401
                if code != 200:
                    self.send_response(code)
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                text = outer.reply(body) if callable(outer.reply) else outer.reply
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _dead_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


def _cfg(url, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.0)
    kw.setdefault("timeout_s", 5.0)
    return JudgeConfig(url=url, model="judge-x", api_key=KEY, **kw)


QUESTIONS = [
    MTBenchQuestion("81", "writing", ("Write a haiku about rain.", "Now make it about snow.")),
    MTBenchQuestion("111", "math", ("What is 2+2?", "And times 3?"), reference=("4", "12")),
]
ANSWERS = {"81": ["Rain falls soft", "Snow falls soft"], "111": ["4", "12"]}


class TestConfig:
    def test_from_env_prefers_domlora_variables(self):
        env = {"DOMLORA_JUDGE_URL": "http://127.0.0.1:9/v1/", "DOMLORA_JUDGE_MODEL": "m1",
               "DOMLORA_JUDGE_API_KEY": "k1", "OPENAI_BASE_URL": "http://other/v1", "OPENAI_API_KEY": "k2",
               "OPENAI_MODEL": "m2"}
        cfg = JudgeConfig.from_env(env)
        assert (cfg.url, cfg.model, cfg.api_key) == ("http://127.0.0.1:9/v1", "m1", "k1")
        cfg2 = JudgeConfig.from_env({"OPENAI_API_KEY": "k2", "OPENAI_MODEL": "m2"})
        assert cfg2.url == "https://api.openai.com/v1" and cfg2.api_key == "k2"

    def test_unconfigured_says_why(self):
        assert JudgeConfig.from_env({}) is None
        assert JudgeConfig.from_env({"DOMLORA_JUDGE_URL": "http://x/v1"}) is None
        why = why_unconfigured({"DOMLORA_JUDGE_URL": "http://x/v1"})
        assert "DOMLORA_JUDGE_MODEL" in why and "DOMLORA_JUDGE_URL" not in why.split("set ")[1].split(" (")[0]

    def test_key_is_not_in_repr_or_description(self):
        cfg = JudgeConfig(url="https://user:pw@judge.example/v1?token=abc", model="m", api_key=KEY)
        assert KEY not in repr(cfg) and KEY not in json.dumps(cfg.describe())
        assert cfg.describe()["url"] == "https://judge.example/v1"
        assert redact_url("http://a:b@h:81/v1?k=1") == "http://h:81/v1"

    @pytest.mark.parametrize("url", ["", "ftp://x", "judge.example/v1"])
    def test_bad_url(self, url):
        with pytest.raises(ConfigError):
            JudgeConfig(url=url, model="m")


def test_parse_rating():
    assert parse_rating("blah Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [[7.5]] and [[2]]") == 7.5
    assert parse_rating("score [6]") == 6.0
    assert parse_rating("no score here") is None
    assert parse_rating("Rating: [[42]]") is None


def test_reference_questions_use_the_math_prompts():
    prompts = load_judge_prompts()
    name, msgs = build_judge_messages(QUESTIONS[1], ANSWERS["111"], 1, prompts)
    assert name == "single-math-v1" and "[The Start of Reference Answer]\n4\n" in msgs[1]["content"]
    name2, msgs2 = build_judge_messages(QUESTIONS[1], ANSWERS["111"], 2, prompts)
    assert name2 == "single-math-v1-multi-turn" and "And times 3?" in msgs2[1]["content"]
    name3, msgs3 = build_judge_messages(QUESTIONS[0], ANSWERS["81"], 2, prompts)
    assert name3 == "single-v1-multi-turn"
    assert msgs3[0]["role"] == "system" and "second user question" in msgs3[0]["content"]


class TestQuestions:
    def test_local_stand_ins_in_both_formats(self, tmp_path):
        fastchat = tmp_path / "question.jsonl"
        fastchat.write_text("".join(json.dumps({"question_id": 81 + i, "category": "writing",
                                                "turns": [f"q{i}a", f"q{i}b"]}) + "\n" for i in range(3)))
        qs = load_mt_bench(fastchat)
        assert [q.question_id for q in qs] == ["81", "82", "83"] and qs[0].turns == ("q0a", "q0b")
        h4 = tmp_path / "h4.json"
        h4.write_text(json.dumps([{"prompt": ["a", "b"], "prompt_id": 7, "category": "math",
                                   "reference": ["1", "2"]}]))
        (q,) = load_mt_bench(h4)
        assert q.reference == ("1", "2") and q.category == "math"

    def test_malformed_file(self, tmp_path):
        bad = tmp_path / "q.jsonl"
        bad.write_text(json.dumps({"question_id": 1, "turns": ["only one"]}) + "\n")
        with pytest.raises(DataError, match="two user turns"):
            load_mt_bench(bad)
        bad.write_text("{not json")
        with pytest.raises(DataError, match="not valid JSON"):
            load_mt_bench(bad)
        with pytest.raises(DataError, match="does not exist"):
            load_mt_bench(tmp_path / "missing.jsonl")

    def test_hub_unavailable_offline_is_a_clear_error(self, monkeypatch):
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(DataError, match="question.jsonl"):
            load_mt_bench("domlora-test/no-such-mt-bench")


class TestEndpoint:
    def test_completion_sends_key_and_model(self):
        with _Judge() as j:
            out = chat_completion(_cfg(j.url), [{"role": "user", "content": "hi"}])
        assert "[[7]]" in out
        call = j.calls[0]
        assert call["path"] == "/v1/chat/completions" and call["auth"] == f"Bearer {KEY}"
        assert call["body"]["model"] == "judge-x" and call["body"]["temperature"] == 0.0

    def test_retries_with_backoff_then_succeeds(self):
        delays = []
        with _Judge(plan=[500, 429]) as j:
            out = chat_completion(_cfg(j.url, max_retries=3, backoff_s=1.0), [{"role": "user", "content": "x"}],
                                  sleep=delays.append)
        assert "[[7]]" in out and len(j.calls) == 3
        assert len(delays) == 2 and 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # doubling, with jitter

    def test_rejected_key_fails_at_once_without_leaking_it(self, caplog):
        with _Judge(require_key="another-key") as j, caplog.at_level(logging.DEBUG):
            with pytest.raises(JudgeError) as ei:
                chat_completion(_cfg(j.url, max_retries=3), [{"role": "user", "content": "x"}], sleep=lambda s: None)
        assert len(j.calls) == 1 and "401" in str(ei.value) and "API key" in str(ei.value)
        assert KEY not in str(ei.value) and KEY not in caplog.text

    def test_server_down_fails_after_retries(self, caplog):
        delays = []
        with caplog.at_level(logging.DEBUG), pytest.raises(JudgeError) as ei:
            chat_completion(_cfg(_dead_url(), max_retries=2, backoff_s=0.01), [{"role": "user", "content": "x"}],
                            sleep=delays.append)
        assert len(delays) == 2 and "after 3 attempts" in str(ei.value)
        assert KEY not in str(ei.value) and KEY not in caplog.text


def test_grade_mt_bench_scores_both_turns():
    def reply(body):
        user = body["messages"][1]["content"]
        return "Rating: [[9]]" if "Reference" in user else "ok. Rating: [[5]]"

    with _Judge(reply=reply) as j:
        s = grade_mt_bench(_cfg(j.url, workers=2), QUESTIONS, ANSWERS)
    assert len(j.calls) == 4 and s.n == 4 and s.n_unrated == 0
    assert s.score == pytest.approx(7.0) and s.stderr == pytest.approx(1.1547, rel=1e-3)
    assert s.score_turn1 == pytest.approx(7.0) and s.score_turn2 == pytest.approx(7.0)
    assert {(j.question_id, j.turn) for j in s.judgments} == {("81", 1), ("81", 2), ("111", 1), ("111", 2)}


def test_grade_without_any_rating_fails():
    with _Judge(reply="I refuse to rate.") as j, pytest.raises(JudgeError, match="rating"):
        grade_mt_bench(_cfg(j.url), QUESTIONS, ANSWERS)

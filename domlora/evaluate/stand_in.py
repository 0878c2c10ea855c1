"""Stand-in evaluation data: lm-eval's own tasks on a few synthetic rows in each dataset's schema, for an
offline rehearsal of the paper grid. Never benchmark numbers.

`write_stand_in_data(DIR)` writes, for every hub dataset the paper's tasks read, a few rows per split
under `DIR/<dataset path>/<config>/<split>.jsonl` (the columns and types the task's prompts,
`process_docs`, targets and few-shot split use), plus `DIR/mt_bench/question.jsonl` and a
`stand_in.json` manifest. `evaluate(..., stand_in_data=DIR)` then runs each task as
`<task>_stand_in`: a generated lm-eval YAML that `include`s the real task's YAML and replaces only
its data source (`custom_dataset` reading those files), so prompts, few-shot examples, filters and
metrics stay lm-eval's; groups (MMLU, MATH, TyDiQA) are rebuilt member by member the same way.
`stand_in_judge()` serves a deterministic MT-Bench judge on loopback.

Run as: python -m domlora.evaluate.stand_in DIR   (writes the stand-in data)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from domlora.errors import ConfigError, DataError
from domlora.eval_tasks import TASKS_DIR
from domlora.evaluate.mt_bench import JudgeConfig
from domlora.evaluate.tasks import TASKS
from domlora.io import atomic_dir, file_sha256, iter_jsonl, read_json, write_json, write_jsonl, write_text

logger = logging.getLogger(__name__)

SUFFIX = "_stand_in"
"""lm-eval name of a task's stand-in variant: `<name>_stand_in`"""
MANIFEST = "stand_in.json"
NOTE = ("STAND-IN DATA: a few synthetic rows in each benchmark's schema, for rehearsing the pipeline offline; "
        "these are not benchmark results and must not be reported as such")
STAND_IN_TASKS = ("mmlu", "mmlu_gen", "tydiqa", "commonsense_qa", "commonsense_qa_gen", "truthfulqa_mc2",
                  "truthfulqa_mc1_gen", "gsm8k_cot_llama", "logiqa", "logiqa_gen", "minerva_math",
                  "humaneval_sandbox", "humaneval_plus_sandbox")
"""domlora's lm-eval tasks that read hub datasets (the embedded tasks are local already; MT-Bench reads
`mt_bench/question.jsonl`)"""
LM_EVAL_FOLDERS = ("mmlu/default", "commonsense_qa", "truthfulqa", "logiqa", "gsm8k", "minerva_math",
                   "benchmarks", "tydiqa")
"""the folders of lm-eval's task library that define those tasks (indexing only these takes ~1 s, not ~15 s)"""
MT_BENCH_QUESTIONS = Path("mt_bench") / "question.jsonl"


# ------------------------------------------------------------------------------------------
# the real tasks: which YAMLs, which datasets and splits
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One lm-eval task (not a group) that a stand-in task replaces the data of."""

    name: str
    """the real task's lm-eval name (e.g. mmlu_anatomy)"""
    yaml_path: Path
    """the real task's YAML"""
    dataset: str
    """hub dataset path and config, e.g. `cais/mmlu/anatomy` (the stand-in data folder under DIR)"""
    splits: tuple[str, ...]
    """every split the task declares (evaluation and few-shot)"""
    eval_split: str
    """the split it scores (test, else validation)"""


def _task_index():
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).resolve().parent
    # indexing these folders one by one, lm-eval warns that a tag they share "overrides" itself
    log = logging.getLogger("lm_eval.tasks._index")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        tm = TaskManager(include_path=[root / f for f in LM_EVAL_FOLDERS] + [TASKS_DIR], include_defaults=False)
    finally:
        log.setLevel(level)
    return tm.task_index


def _leaf(name: str, entry) -> Leaf:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=False)
    if not cfg.get("dataset_path"):
        raise ConfigError(f"lm-eval task {name} ({entry.yaml_path}) names no dataset_path; it has no stand-in")
    dataset = "/".join(p for p in (cfg["dataset_path"], cfg.get("dataset_name")) if p)
    few = cfg.get("fewshot_config") or {}
    roles = [cfg.get("test_split"), cfg.get("validation_split"), cfg.get("training_split"),
             cfg.get("fewshot_split"), few.get("split") if isinstance(few, dict) else None]
    splits = tuple(dict.fromkeys(s for s in roles if s))
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if not eval_split:
        raise ConfigError(f"lm-eval task {name} declares neither test_split nor validation_split")
    return Leaf(name, Path(entry.yaml_path), dataset, splits, eval_split)


@dataclass
class _Plan:
    leaves: dict[str, Leaf] = field(default_factory=dict)
    """stand-in task name -> the real task it replaces the data of"""
    groups: dict[str, dict] = field(default_factory=dict)
    """stand-in group name -> its YAML document"""


def _walk(name: str, index, plan: _Plan) -> str:
    """Plan the stand-in of task/group `name` (and of its members); return its stand-in name."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = index.get(name)
    if entry is None:
        raise ConfigError(f"no lm-eval task or group {name!r} in {', '.join(LM_EVAL_FOLDERS)} or domlora's tasks")
    new = name + SUFFIX
    if entry.kind == Kind.TAG:
        raise ConfigError(f"{name} is an lm-eval tag, not a task; name a task or group")
    if entry.kind != Kind.GROUP:
        plan.leaves.setdefault(new, _leaf(name, entry))
        return new
    if new in plan.groups:
        return new
    raw = load_yaml(entry.yaml_path, resolve_func=False)
    plan.groups[new] = {"include": str(Path(entry.yaml_path).resolve()), "group": new,
                        "task": _members(raw.get("task") or [], index, plan)}
    return new


def _members(items, index, plan: _Plan) -> list:
    from lm_eval.tasks._index import Kind

    out: list = []
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, str):
            entry = index.get(item)
            if entry is not None and entry.kind == Kind.TAG:  # a tag stands for its tasks
                out += [_walk(t, index, plan) for t in sorted(entry.tags)]
            else:
                out.append(_walk(item, index, plan))
        elif isinstance(item, dict) and "group" in item and item["group"] in index:
            out.append({**item, "group": _walk(item["group"], index, plan)})
        elif isinstance(item, dict) and "group" in item:  # an inline group: rebuild its members
            out.append({**item, "task": _members(item.get("task") or [], index, plan)})
        elif isinstance(item, dict) and isinstance(item.get("task"), str):
            out.append({**item, "task": _walk(item["task"], index, plan)})
        else:
            raise ConfigError(f"cannot make a stand-in for group member {item!r}")
    return out


def plan_stand_ins(tasks: Sequence[str] = STAND_IN_TASKS, *, index=None) -> _Plan:
    """The stand-in leaves and groups for domlora task names (see `STAND_IN_TASKS`)."""
    index = index if index is not None else _task_index()
    plan = _Plan()
    for t in tasks:
        if t not in STAND_IN_TASKS:
            raise ConfigError(f"task {t!r} has no stand-in; stand-ins exist for {', '.join(STAND_IN_TASKS)} "
                              "(and the embedded tasks and mt_bench read local data anyway)")
        _walk(TASKS[t].lm_eval, index, plan)
    return plan


# ------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------

_WORDS = ["river", "lamp", "garden", "violin", "harbor", "pencil", "meadow", "castle", "kettle", "bridge"]
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]


def _numeric_options(rng: random.Random, answer: int, n: int) -> tuple[list[str], int]:
    opts = {answer}
    while len(opts) < n:
        opts.add(answer + rng.randint(-9, 9))
    opts = sorted(opts)
    rng.shuffle(opts)
    return [str(o) for o in opts], opts.index(answer)


def _mmlu(rng, config, split, i):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    choices, answer = _numeric_options(rng, a + b, 4)
    return {"question": f"In a {config.replace('_', ' ')} exercise, what is {a} + {b}?", "subject": config,
            "choices": choices, "answer": answer}


def _commonsense_qa(rng, config, split, i):
    thing = rng.choice(_WORDS)
    places = rng.sample(["kitchen", "library", "forest", "station", "museum", "attic", "office", "beach"], 5)
    key = "ABCDE"[rng.randrange(5)]
    return {"id": hashlib.sha256(f"csqa{split}{i}{thing}".encode()).hexdigest()[:32],
            "question": f"Where would you most likely keep a {thing}?", "question_concept": thing,
            "choices": {"label": list("ABCDE"), "text": places}, "answerKey": key}


def _truthful_qa(rng, config, split, i):
    thing = rng.choice(_WORDS)
    return {"question": f"What happens if you leave a {thing} outside overnight?",
            "mc1_targets": {"choices": [f"Nothing in particular happens to the {thing}.",
                                        f"The {thing} turns to gold.", f"The {thing} disappears forever.",
                                        f"The {thing} brings bad luck."], "labels": [1, 0, 0, 0]},
            "mc2_targets": {"choices": [f"Nothing in particular happens to the {thing}.", f"The {thing} may get wet.",
                                        f"The {thing} turns to gold.", f"The {thing} brings bad luck."],
                            "labels": [1, 1, 0, 0]}}


def _logiqa(rng, config, split, i):
    x, y, z = rng.sample(_NAMES, 3)
    options = [f"{x} is taller than {z}.", f"{z} is taller than {x}.", f"{y} is the shortest.", f"{z} is the tallest."]
    order = list(range(4))
    rng.shuffle(order)
    return {"label": "abcd"[order.index(0)], "context": f"{x} is taller than {y}. {y} is taller than {z}.",
            "question": "Which of the following must be true?", "options": [options[k] for k in order]}


def _gsm8k(rng, config, split, i):
    who, a, b = rng.choice(_NAMES), rng.randint(2, 40), rng.randint(2, 40)
    return {"question": f"{who} has {a} marbles and finds {b} more. How many marbles does {who} have now?",
            "answer": f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} marbles.\n#### {a + b}"}


_MATH_TYPES = {"algebra": "Algebra", "counting_and_probability": "Counting & Probability", "geometry": "Geometry",
               "intermediate_algebra": "Intermediate Algebra", "number_theory": "Number Theory",
               "prealgebra": "Prealgebra", "precalculus": "Precalculus"}


def _hendrycks_math(rng, config, split, i):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return {"problem": f"What is ${a} \\cdot {b}$?", "level": f"Level {rng.randint(1, 5)}",
            "type": _MATH_TYPES.get(config, config),
            "solution": f"We multiply: ${a} \\cdot {b} = \\boxed{{{a * b}}}$."}


# (signature, docstring, body, test cases as (argument, result) source text); HumanEval's layout:
# the prompt is the signature and a docstring with an example, the solution the body
_PROBLEMS = [
    ("def add_three(x: int) -> int:", "Return x plus three.", "    return x + 3\n",
     [("1", "4"), ("-3", "0"), ("10", "13")]),
    ("def count_vowels(s: str) -> int:", "Count the vowels (aeiou) in s.", "    return sum(ch in 'aeiou' for ch in s)\n",
     [("'banana'", "3"), ("''", "0"), ("'xyz'", "0")]),
    ("from typing import List\n\n\ndef largest(xs: List[int]) -> int:", "Return the largest number of a non-empty list.",
     "    return max(xs)\n", [("[3, 9, 2]", "9"), ("[-1]", "-1"), ("[5, 5]", "5")]),
    ("def reverse_words(s: str) -> str:", "Reverse the order of the words in s.", "    return ' '.join(s.split()[::-1])\n",
     [("'a b c'", "'c b a'"), ("'one'", "'one'"), ("''", "''")]),
]


def _humaneval(rng, config, split, i, *, plus=False):
    signature, doc, solution, cases = _PROBLEMS[i % len(_PROBLEMS)]
    entry = signature.rsplit("def ", 1)[1].split("(", 1)[0]
    example, result = cases[0]
    prompt = f'{signature}\n    """{doc}\n    >>> {entry}({example})\n    {result}\n    """\n'
    checks = "".join(f"    assert candidate({x}) == {y}\n" for x, y in (cases if plus else cases[:2]))
    return {"task_id": f"StandIn/{i}", "prompt": prompt, "canonical_solution": solution,
            "test": f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n{checks}", "entry_point": entry}


_TYDIQA_LANGS = ["arabic", "bengali", "english", "finnish", "indonesian", "korean", "russian", "swahili", "telugu"]


def _tydiqa(rng, config, split, n):
    """One row per language and split (lm-eval's tydiqa_goldp_<lang> keeps the rows whose id starts `<language>-`)."""
    rows = []
    for lang in _TYDIQA_LANGS:
        name, km = f"{rng.choice(_NAMES)}{rng.choice(_WORDS)}", rng.randint(10, 900)
        context = f"The {name} river is {km} kilometres long and flows into the sea."
        answer = f"{km} kilometres"
        rows.append({"id": f"{lang}-{rng.randrange(10**12)}-{split}", "title": name, "context": context,
                     "question": f"How long is the {name} river?",
                     "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    return rows


ROWS = {
    "cais/mmlu": _mmlu, "tau/commonsense_qa": _commonsense_qa, "truthfulqa/truthful_qa": _truthful_qa,
    "EleutherAI/logiqa": _logiqa, "openai/gsm8k": _gsm8k, "EleutherAI/hendrycks_math": _hendrycks_math,
    "openai/openai_humaneval": _humaneval,
    "evalplus/humanevalplus": lambda rng, config, split, i: _humaneval(rng, config, split, i, plus=True),
}
"""hub dataset path -> row maker (rng, config, split, index) -> one row in that dataset's schema"""
PER_SPLIT = {"google-research-datasets/tydiqa": _tydiqa}
"""hub dataset path -> maker of a whole split (rng, config, split, n) -> rows"""


def _mt_bench_questions() -> list[dict]:
    # FastChat's question.jsonl; "math" carries reference answers, so the judge uses its reference prompts
    return [{"question_id": 81, "category": "writing",
             "turns": ["Write a two-sentence note inviting a neighbour to tea.", "Now make it more formal."]},
            {"question_id": 111, "category": "math", "turns": ["What is 12 times 7?", "And that result minus 4?"],
             "reference": ["84", "80"]}]


def write_stand_in_data(out_dir: str | os.PathLike, *, rows: int = 2, seed: int = 0,
                        tasks: Sequence[str] = STAND_IN_TASKS) -> Path:
    """Write the stand-in data of `tasks` (all by default) and the MT-Bench questions into `out_dir`.

    Each dataset config gets `rows` rows in the split a task scores and one row in every other split
    it declares (few-shot, training); datasets split into many configs (MMLU's 57 subjects, MATH's 7
    subsets) get one row per config and split, TyDiQA one per language and split, so every member of
    those groups runs. Deterministic for a seed; no network. The folder is replaced whole.

    Returns:
        the folder (its `stand_in.json` says what it is and lists the files).
    """
    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows must be a positive integer, got {rows!r}")
    plan = plan_stand_ins(tasks)
    wanted: dict[str, dict[str, int]] = {}
    configs_per_path: dict[str, set] = {}
    for leaf in plan.leaves.values():
        path, config = _split_dataset(leaf.dataset)
        configs_per_path.setdefault(path, set()).add(config)
    for leaf in plan.leaves.values():
        path, _ = _split_dataset(leaf.dataset)
        n_eval = 1 if len(configs_per_path[path]) > 1 else rows
        splits = wanted.setdefault(leaf.dataset, {})
        for s in leaf.splits:
            splits[s] = max(splits.get(s, 0), n_eval if s == leaf.eval_split else 1)
    files: dict[str, dict[str, int]] = {}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for dataset, splits in sorted(wanted.items()):
            path, config = _split_dataset(dataset)
            if path not in ROWS and path not in PER_SPLIT:
                raise ConfigError(f"no stand-in rows for the hub dataset {path}; fix: add a row maker to "
                                  "domlora.evaluate.stand_in.ROWS")
            for split, n in sorted(splits.items()):
                rng = random.Random(f"{seed}:{dataset}:{split}")
                if path in PER_SPLIT:
                    data = PER_SPLIT[path](rng, config, split, n)
                else:
                    data = [ROWS[path](rng, config, split, i) for i in range(n)]
                write_jsonl(tmp / dataset / f"{split}.jsonl", data)
                files.setdefault(dataset, {})[split] = len(data)
        write_jsonl(tmp / MT_BENCH_QUESTIONS, _mt_bench_questions())
        write_json(tmp / MANIFEST, {"kind": "domlora stand-in evaluation data", "note": NOTE, "seed": seed,
                                    "rows": rows, "tasks": list(tasks), "datasets": files,
                                    "mt_bench": str(MT_BENCH_QUESTIONS)})
    logger.info("wrote stand-in data for %d datasets to %s", len(files), out)
    return out


def _split_dataset(dataset: str) -> tuple[str, str | None]:
    parts = dataset.split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


# ------------------------------------------------------------------------------------------
# the stand-in tasks
# ------------------------------------------------------------------------------------------

def load_stand_in(data_files: Mapping[str, str] | None = None, **_) -> dict:
    """lm-eval `custom_dataset` body: {split: Dataset} from the stand-in JSONL files."""
    import datasets

    if not data_files:
        raise DataError("a stand-in task was built without data_files; fix: rebuild it with stand_in_tasks()")
    return datasets.DatasetDict({split: datasets.Dataset.from_list([r for _, r in iter_jsonl(f, error=DataError)])
                                 for split, f in data_files.items()})


def check_stand_in_dir(data_dir: str | os.PathLike) -> Path:
    """The stand-in folder, checked to be one (its manifest).

    Raises:
        DataError: no such folder or no manifest; the message says how to write it.
    """
    d = Path(data_dir)
    if not (d / MANIFEST).is_file():
        raise DataError(f"{d} holds no stand-in data (no {MANIFEST}); fix: write it with "
                        f"`python -m domlora.evaluate.stand_in {d}` (or write_stand_in_data({str(d)!r}))")
    try:
        doc = read_json(d / MANIFEST)
    except (OSError, ValueError) as exc:
        raise DataError(f"{d / MANIFEST} is unreadable ({exc}); fix: write the stand-in data again") from None
    if not isinstance(doc, dict) or doc.get("kind") != "domlora stand-in evaluation data":
        raise DataError(f"{d / MANIFEST} is not a stand-in manifest; fix: write the stand-in data again")
    return d


def stand_in_digest(data_dir: str | os.PathLike) -> str:
    """sha256 over the stand-in files (names and bytes), for the tasks' config hashes."""
    h = hashlib.sha256()
    root = Path(data_dir)
    for f in sorted(root.rglob("*.jsonl")):
        h.update(str(f.relative_to(root)).encode())
        file_sha256(f, h)
    return h.hexdigest()[:16]


def _leaf_yaml(new: str, leaf: Leaf, data_dir: Path) -> str:
    files = {}
    for s in leaf.splits:
        f = data_dir / leaf.dataset / f"{s}.jsonl"
        if not f.is_file():
            raise DataError(f"no stand-in {s} split for {leaf.dataset} (task {leaf.name}) under {data_dir}; fix: "
                            f"write the stand-in data again (`python -m domlora.evaluate.stand_in {data_dir}`)")
        files[s] = str(f.resolve())
    # the real task, its data read from the stand-in files; nothing else changes
    doc = {"include": str(leaf.yaml_path.resolve()), "task": new, "tag": [], "dataset_kwargs": {"data_files": files}}
    return (f"# stand-in of lm-eval's {leaf.name}: {leaf.dataset} replaced by local rows\n" + _dump(doc)
            + "custom_dataset: !function domlora.evaluate.stand_in.load_stand_in\n")


def _dump(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)


def stand_in_tasks(tasks: Sequence[str], data_dir: str | os.PathLike, task_dir: str | os.PathLike) -> dict[str, str]:
    """Write the stand-in task YAMLs of domlora `tasks` into `task_dir`; return {task: lm-eval stand-in name}.

    Load them with `TaskManager(include_path=[TASKS_DIR, task_dir], include_defaults=False)`.

    Raises:
        ConfigError: a task without a stand-in. DataError: stand-in data missing.
    """
    data_dir = check_stand_in_dir(data_dir).resolve()
    plan = plan_stand_ins(tasks)
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    for new, leaf in plan.leaves.items():
        write_text(task_dir / f"{new}.yaml", _leaf_yaml(new, leaf, data_dir))
    for new, doc in plan.groups.items():
        write_text(task_dir / f"{new}.yaml", f"# stand-in of the group {new[:-len(SUFFIX)]}\n" + _dump(doc))
    return {t: TASKS[t].lm_eval + SUFFIX for t in tasks}


def stand_in_task_manager(task_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None):
    """lm-eval's TaskManager over domlora's task YAMLs and the stand-in YAMLs in `task_dir` (not lm-eval's library:
    the stand-ins include the real YAMLs by path)."""
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(data_dir)} if data_dir is not None else {}
    return TaskManager(include_path=[str(TASKS_DIR), str(task_dir)], include_defaults=False, metadata=meta)


# ------------------------------------------------------------------------------------------
# the MT-Bench judge
# ------------------------------------------------------------------------------------------

JUDGE_MODEL = "stand-in-judge"
JUDGE_KEY = "stand-in-no-key"


@dataclass(frozen=True)
class StandInJudge:
    """A running stand-in judge: an OpenAI-compatible `/v1/chat/completions` on loopback."""

    url: str
    """base URL ending in /v1 (what DOMLORA_JUDGE_URL is set to)"""
    calls: list = field(default_factory=list, compare=False)
    """the requests received, in order: {"path", "authorization", "body"}"""

    @property
    def config(self):
        """A `JudgeConfig` for this judge (to pass as `evaluate(judge=...)` instead of the environment)."""
        return JudgeConfig(url=self.url, model=JUDGE_MODEL, api_key=JUDGE_KEY, max_retries=1, backoff_s=0.0,
                           timeout_s=30.0)


def stand_in_rating(messages: Sequence[Mapping]) -> int:
    """The stand-in judge's rating of a request: 1-10 from a sha256 of its messages (same request, same rating)."""
    blob = json.dumps([m.get("content", "") for m in messages], ensure_ascii=False).encode()
    return 1 + int(hashlib.sha256(blob).hexdigest(), 16) % 10


@contextlib.contextmanager
def stand_in_judge(*, rating: int | None = None, set_env: bool = True) -> Iterator[StandInJudge]:
    """Serve a deterministic MT-Bench judge on 127.0.0.1 for the block (a thread; stopped on exit).

    Every chat completion answers "Stand-in judge, not a real grading.\\nRating: [[k]]", with k =
    `rating`, or `stand_in_rating(messages)`. With `set_env`, DOMLORA_JUDGE_URL / _MODEL / _API_KEY
    point at it for the block (the key is a placeholder, so no real key is ever sent here), and
    `evaluate()` and `JudgeConfig.from_env` find it; the previous values come back on exit.
    """
    if rating is not None and not (isinstance(rating, int) and 1 <= rating <= 10):
        raise ConfigError(f"the stand-in judge's rating must be an integer 1-10, got {rating!r}")
    calls: list = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                messages = body["messages"]
            except (ValueError, KeyError, TypeError):
                self.send_response(400)
                self.end_headers()
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self.send_response(404)
                self.end_headers()
                return
            calls.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
            k = rating if rating is not None else stand_in_rating(messages)
            payload = json.dumps({"id": f"stand-in-{len(calls)}", "object": "chat.completion",
                                  "model": body.get("model", JUDGE_MODEL),
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant",
                                      "content": f"Stand-in judge, not a real grading.\nRating: [[{k}]]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="stand-in-judge", daemon=True)
    thread.start()
    judge = StandInJudge(url=f"http://127.0.0.1:{server.server_address[1]}/v1", calls=calls)
    # a placeholder key, so that JudgeConfig.from_env never falls back to OPENAI_API_KEY for this judge
    env = {"DOMLORA_JUDGE_URL": judge.url, "DOMLORA_JUDGE_MODEL": JUDGE_MODEL, "DOMLORA_JUDGE_API_KEY": JUDGE_KEY}
    saved = {k: os.environ.get(k) for k in env}
    try:
        if set_env:
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        logger.info("stand-in MT-Bench judge at %s", judge.url)
        yield judge
    finally:
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="write stand-in evaluation data (synthetic rows; not benchmarks)")
    p.add_argument("out", help="folder to write (replaced whole)")
    p.add_argument("--rows", type=int, default=2, help="rows per dataset config in the split a task scores")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    a = p.parse_args(argv)
    print(write_stand_in_data(a.out, rows=a.rows, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

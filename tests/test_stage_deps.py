"""Every DVC stage depends on exactly the code it runs: the `domlora/` files its entry script imports,
followed through every in-package import (module level and inside functions), are its dvc.yaml deps.

A file a stage runs but does not depend on serves stale results from the cache when it changes; a file it
depends on but does not run reruns it for nothing (a report renderer retraining every cell).
Print the deps each stage should have: python -m tests.test_stage_deps
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = "domlora"
# code a stage runs that no import reaches: lm-eval loads the task folders' utils.py by path
DATA_DEPS = {"domlora/eval_tasks": ("evaluate", "evaluate_base")}


@dataclass(frozen=True)
class Edge:
    target: str
    """the imported file, relative to the root"""
    source: str
    """the importing file"""
    line: int


def _module_file(root: Path, name: str) -> Path | None:
    p = root.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_package(root: Path, package: str) -> bool:
    """Whether a package hands out names through a module `__getattr__` (its lazy re-exports)."""
    init = _module_file(root, package)
    if init is None or init.name != "__init__.py":
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(init.read_text()).body)


def _package_files(root: Path, package: str) -> list[Path]:
    return sorted(p for p in root.joinpath(*package.split(".")).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(root: Path, path: Path) -> list[tuple[Path, int]]:
    """The in-package files `path` imports (module level or inside functions), with the line of each import.

    A package's `__init__` runs with each of its modules. The body of a package's module `__getattr__` (its lazy
    re-exports) is not followed; a name taken from such a package that is not one of its modules may come from
    any of them, so all of them count.
    """
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(root, path)
    skip = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.update(id(n) for n in ast.walk(node))
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PKG:
                continue
            names.append((mod, node.lineno))
            for a in node.names:
                if _module_file(root, f"{mod}.{a.name}"):
                    names.append((f"{mod}.{a.name}", node.lineno))
                elif _lazy_package(root, mod):
                    names += [(_module_name(root, p), node.lineno) for p in _package_files(root, mod)]
    out = []
    for name, line in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # every enclosing package's __init__ runs too
            f = _module_file(root, ".".join(parts[:i]))
            if f is not None:
                out.append((f, line))
    return out


def closure(root: Path, entries: list[Path]) -> dict[str, Edge | None]:
    """Every file the entries run -> the import that first reaches it (None for an entry)."""
    seen: dict[str, Edge | None] = {}
    todo = [(e, None) for e in entries]
    while todo:
        f, edge = todo.pop(0)
        key = f.relative_to(root).as_posix()
        if key in seen:
            continue
        seen[key] = edge
        todo += [(g, Edge(g.relative_to(root).as_posix(), key, line)) for g, line in imports_of(root, f)]
    return seen


def _stages(root: Path) -> dict[str, dict]:
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    return {name: st.get("do", st) for name, st in doc["stages"].items()}


def _entry(root: Path, cmd: str) -> Path:
    words = cmd.split()
    return root / (words[words.index("-m") + 1].replace(".", "/") + ".py")


def _covers(dep: str, f: str) -> bool:
    return f == dep or f.startswith(dep.rstrip("/") + "/")


def stage_code(root: Path, name: str, stage: dict) -> dict[str, Edge | None]:
    """The `domlora/` files a stage runs (its entry script's imports, and the code its data deps carry)."""
    entries = [_entry(root, stage["cmd"])]
    for d, users in DATA_DEPS.items():
        if name in users:
            entries += [p for p in _package_files(root, d.replace("/", "."))]
    return {f: e for f, e in closure(root, entries).items() if f.split("/")[0] == PKG}


def expected_deps(root: Path, files) -> list[str]:
    """The files as dvc.yaml deps: a folder where the stage runs every Python file in it, else the files."""
    files = set(files)
    out: set[str] = set()
    for f in files:
        parts = f.split("/")
        best = f
        for i in range(len(parts) - 1, 1, -1):  # the widest folder below domlora/ the stage runs whole
            d = "/".join(parts[:i])
            inside = {p.relative_to(root).as_posix() for p in (root / d).rglob("*") if p.is_file()
                      and "__pycache__" not in p.parts}
            if inside and inside <= files:
                best = d
        out.add(best)
    return sorted(out)


def check_stage_deps(root: Path) -> list[str]:
    """One message per stage whose `domlora/` deps differ from the code it runs (empty: all agree)."""
    problems = []
    for name, stage in _stages(root).items():
        runs = stage_code(root, name, stage)
        deps = [d for d in stage.get("deps", []) if isinstance(d, str) and d.split("/")[0] == PKG]
        data = [d for d, users in DATA_DEPS.items() if name in users]
        missing = sorted(f for f in runs if not any(_covers(d, f) for d in deps))
        unneeded = []
        for d in deps:
            if d in data:
                continue
            inside = [d] if (root / d).is_file() else [p.relative_to(root).as_posix() for p in (root / d).rglob("*")
                                                        if p.is_file() and "__pycache__" not in p.parts]
            if not inside or any(f not in runs for f in inside):
                unneeded.append(d)
        unneeded += [d for d in data if d not in deps]  # a data dep the stage needs is missing, not unneeded
        if missing:
            why = "; ".join(f"{f} (imported by {runs[f].source}:{runs[f].line})" for f in missing[:3])
            lines = "\n".join(f"        - {d}" for d in expected_deps(root, missing))
            problems.append(f"stage {name} runs code its deps do not cover: {why}"
                            f"{' ...' if len(missing) > 3 else ''}; fix: add to stages.{name} deps in dvc.yaml:\n"
                            f"{lines}")
        if unneeded:
            problems.append(f"stage {name} depends on {', '.join(unneeded)}, which it does not run (or not all of "
                            f"it); fix: remove from stages.{name} deps in dvc.yaml (the code it runs: "
                            f"{', '.join(expected_deps(root, runs))})")
    return problems


def test_every_stage_depends_on_exactly_the_code_it_runs():
    problems = check_stage_deps(ROOT)
    assert not problems, "\n\n".join(problems)


def test_the_core_does_not_import_the_studies():
    core = [p for d in ("pipeline", "train", "evaluate", "regimes", "probes", "adapters")
            for p in _package_files(ROOT, f"{PKG}.{d}")]
    core += [p for p in (ROOT / PKG).glob("*.py")]
    bad = [f"{p.relative_to(ROOT)} imports {g.relative_to(ROOT)} (line {line})" for p in core
           for g, line in imports_of(ROOT, p) if g.relative_to(ROOT).parts[:2] == (PKG, "studies")]
    assert not bad, bad


def test_training_does_not_run_the_report_the_studies_or_the_probes():
    stages = _stages(ROOT)
    runs = stage_code(ROOT, "train", stages["train"])
    assert not [f for f in runs if f.startswith(("domlora/studies/", "domlora/pipeline/report", "domlora/probes/page",
                                                 "domlora/probes/runner", "domlora/probes/activations",
                                                 "domlora/pipeline/sparse_b_report", "domlora/pipeline/placement_report"))]
    assert "domlora/samples.py" in runs  # the tokeniser: what train, probe and evaluate share
    for name in ("probe", "evaluate"):
        assert "domlora/samples.py" in stage_code(ROOT, name, stages[name])


@pytest.fixture
def tiny_repo(tmp_path):
    """A package with two modules and one stage whose deps name only the first."""
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from domlora.a import X\n    return X\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "go.py").write_text("from domlora.a import X\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"go": {
        "cmd": "python -m stages.go", "deps": ["stages/go.py", "domlora/__init__.py", "domlora/a.py"]}}}))
    return tmp_path


def test_deps_that_match_pass(tiny_repo):
    assert check_stage_deps(tiny_repo) == []


def test_a_stage_importing_an_uncovered_module_names_it_and_the_line_to_add(tiny_repo):
    (tiny_repo / "stages" / "go.py").write_text("from domlora.a import X\n\n\ndef main():\n"
                                                "    from domlora.sub.b import f\n    return f()\n")
    [msg] = check_stage_deps(tiny_repo)
    assert "stage go runs code its deps do not cover" in msg
    assert "domlora/sub/__init__.py (imported by stages/go.py:5)" in msg
    assert msg.endswith("deps in dvc.yaml:\n        - domlora/sub")  # every file of the folder runs


def test_a_dep_the_stage_does_not_run_is_named(tiny_repo):
    doc = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())
    doc["stages"]["go"]["deps"].append("domlora/sub/b.py")
    (tiny_repo / "dvc.yaml").write_text(yaml.safe_dump(doc))
    [msg] = check_stage_deps(tiny_repo)
    assert msg.startswith("stage go depends on domlora/sub/b.py, which it does not run")


def test_a_name_from_a_lazy_package_counts_every_module_of_it(tiny_repo):
    (tiny_repo / PKG / "sub" / "__init__.py").write_text("def __getattr__(name):\n    from domlora.sub import b\n"
                                                         "    return getattr(b, name)\n")
    (tiny_repo / "stages" / "go.py").write_text("from domlora.sub import f\n")
    runs = stage_code(tiny_repo, "go", _stages(tiny_repo)["go"])
    assert set(runs) == {"domlora/__init__.py", "domlora/sub/__init__.py", "domlora/sub/b.py", "domlora/a.py"}


if __name__ == "__main__":  # print each stage's deps on domlora/ as dvc.yaml should list them
    for name, stage in _stages(ROOT).items():
        print(f"{name}:")
        data = [d for d, u in DATA_DEPS.items() if name in u]
        code = [f for f in stage_code(ROOT, name, stage) if not any(_covers(d, f) for d in data)]
        for d in expected_deps(ROOT, code) + data:
            print(f"        - {d}")
    sys.exit(0)

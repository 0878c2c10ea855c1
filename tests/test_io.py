"""Atomic outputs: a failure never leaves a half-written file or folder where a reader looks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from domlora.io import atomic_dir, atomic_outputs, read_json, write_json, write_jsonl, write_text


class Boom(Exception):
    pass


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_write_json_round_trip_and_no_temp_left(tmp_path):
    import numpy as np
    import torch

    doc = {"a": 1, "x": np.float32(0.5), "t": torch.tensor(2.0), "p": Path("/x"), "s": {3, 1}, "nan": math.nan}
    path = write_json(tmp_path / "sub" / "doc.json", doc)
    back = read_json(path)
    assert back["a"] == 1 and back["x"] == 0.5 and back["t"] == 2.0 and back["p"] == "/x" and back["s"] == [1, 3]
    assert math.isnan(back["nan"])
    assert listing(tmp_path) == ["sub", "sub/doc.json"]


def test_write_json_refuses_unknown_objects_and_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "doc.json", {"v": 1})
    with pytest.raises(TypeError, match="cannot serialise"):
        write_json(path, {"v": object()})
    assert read_json(path) == {"v": 1}
    assert listing(tmp_path) == ["doc.json"]


def test_write_text_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_text(tmp_path / "f.txt", "old")

    def fail(*_a, **_k):
        raise Boom

    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(Boom):
        write_text(path, "new")
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["f.txt"]


def test_write_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": "é"}, {"b": 2}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"a": "é"}, {"b": 2}]


class TestAtomicDir:
    def test_builds_then_swaps_in(self, tmp_path):
        target = tmp_path / "ckpt"
        with atomic_dir(target) as tmp:
            assert not target.exists()
            (tmp / "w.bin").write_text("1")
        assert listing(tmp_path) == ["ckpt", "ckpt/w.bin"]

    def test_replaces_the_old_folder_whole(self, tmp_path):
        target = tmp_path / "ckpt"
        with atomic_dir(target) as tmp:
            (tmp / "old.bin").write_text("1")
        with atomic_dir(target) as tmp:
            (tmp / "new.bin").write_text("2")
        assert listing(tmp_path) == ["ckpt", "ckpt/new.bin"]

    def test_failure_keeps_the_old_folder(self, tmp_path):
        target = tmp_path / "ckpt"
        with atomic_dir(target) as tmp:
            (tmp / "old.bin").write_text("1")
        with pytest.raises(Boom), atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise Boom
        assert listing(tmp_path) == ["ckpt", "ckpt/old.bin"]


class TestAtomicOutputs:
    def test_moves_files_in_on_success(self, tmp_path):
        out = tmp_path / "probe"
        with atomic_outputs(out) as stage:
            write_json(stage / "page.json", {"a": 1})
            (stage / "plots").mkdir()
            (stage / "plots" / "p.png").write_bytes(b"png")
            assert not out.exists()  # nothing visible before the body finishes
        assert listing(tmp_path) == ["probe", "probe/page.json", "probe/plots", "probe/plots/p.png"]

    def test_keeps_unrelated_files_and_replaces_its_own(self, tmp_path):
        out = tmp_path / "probe"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "page.json").write_text("stale")
        with atomic_outputs(out) as stage:
            write_json(stage / "page.json", {"fresh": True})
        assert read_json(out / "page.json") == {"fresh": True}
        assert (out / "notes.txt").read_text() == "mine"
        assert listing(tmp_path) == ["probe", "probe/notes.txt", "probe/page.json"]

    def test_failure_creates_nothing(self, tmp_path):
        out = tmp_path / "probe"
        with pytest.raises(Boom), atomic_outputs(out) as stage:
            write_json(stage / "page.json", {"a": 1})
            raise Boom
        assert not out.exists()
        assert listing(tmp_path) == []

    def test_failure_leaves_an_existing_folder_as_it_was(self, tmp_path):
        out = tmp_path / "probe"
        with atomic_outputs(out) as stage:
            write_json(stage / "page.json", {"v": 1})
        with pytest.raises(Boom), atomic_outputs(out) as stage:
            write_json(stage / "page.json", {"v": 2})
            write_json(stage / "nfn.json", {"v": 2})
            raise Boom
        assert read_json(out / "page.json") == {"v": 1}
        assert listing(tmp_path) == ["probe", "probe/page.json"]

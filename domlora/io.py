"""Atomic file output: nothing half-written is ever left where a reader looks."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths show up in results; keep the writer forgiving
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically."""
    return write_text(path, json.dumps(obj, indent=indent, default=_json_default, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_or_none(path: str | os.PathLike) -> Any | None:
    """The JSON document at `path`, or None where it is missing or not JSON (a stage that has not run yet)."""
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def iter_jsonl(path: str | os.PathLike, *, error=ValueError) -> Iterator[tuple[int, Any]]:
    """Yield `(line number, object)` for each non-blank line of a JSON-lines file.

    Raises `error` (a DomloraError subclass at the callers) naming the file and line: for a line
    that is not JSON, and for bytes that are not UTF-8 (with the byte offset and the fix).
    """
    p = Path(path)
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{p}:{lineno}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8 "
                            f"({exc.reason}); fix: re-encode the file as UTF-8, e.g. "
                            f"`iconv -f latin1 -t utf-8 {p.name} > fixed.jsonl`") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                            "fix: one JSON object per line") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows as JSON lines atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` whole.

    On an exception the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old.{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_outputs(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; on success move each file in it into `out_dir` atomically.

    Files already in `out_dir` that the staging folder does not replace are kept; nothing
    is moved if the body raises, so a failed run leaves `out_dir` untouched (and does not
    create it: the staging folder is a hidden sibling).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging.", suffix=".tmp"))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out_dir / item.name
            if item.is_dir():
                if target.exists():
                    shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float = -1) -> Iterator[None]:
    """Hold an inter-process lock on `path` (created if missing) for the block."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout):
        yield


def file_sha256(path: str | os.PathLike, h=None) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks (or fed into the hash object `h`)."""
    import hashlib

    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path

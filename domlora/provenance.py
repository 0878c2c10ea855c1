"""run_info: what produced a result (git commit and dirty flag of the source tree, package versions)."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# the checkout domlora runs from (git answers for it, not for the caller's working directory)
_SOURCE = Path(__file__).resolve().parents[1]
PACKAGES = ("domlora", "torch", "transformers", "peft", "accelerate", "deepspeed", "lm_eval", "datasets")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=_SOURCE, capture_output=True, text=True, check=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> bool | None:
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def versions(packages=PACKAGES) -> dict:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def run_info(**extra) -> dict:
    """The block every result file carries: commit, dirty flag, Python, platform and versions."""
    return {"git_commit": git_commit(), "git_dirty": git_dirty(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions(), **extra}

"""run_info: what produced a result (git commit, dirty flag, package versions)."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
        return bool(out.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def versions(packages=("domlora", "torch", "transformers", "peft", "accelerate", "lm_eval", "datasets")) -> dict:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def run_info(**extra) -> dict:
    return {"git_commit": git_commit(), "git_dirty": git_dirty(), "versions": versions(), **extra}

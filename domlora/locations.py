"""Where things live on disk: the cache of converted checkpoints, and the model configs shipped under configs/."""
from __future__ import annotations

import os
from pathlib import Path

from domlora.errors import ConfigError

CONFIG_DIRS = (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parents[1] / "configs")
"""where shipped model configs (`configs/Qwen3-8B.json`) are looked up"""


def default_cache_dir() -> Path:
    """Where converted checkpoints live: $DOMLORA_CACHE, else ~/.cache/domlora."""
    env = os.environ.get("DOMLORA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "domlora"


def resolve_config(config: str | os.PathLike) -> Path:
    """A config.json path, or a name of one shipped under configs/ (`Qwen3-8B`)."""
    p = Path(config)
    if p.is_file():
        return p
    for d in CONFIG_DIRS:
        for cand in (d / str(config), d / f"{config}.json"):
            if cand.is_file():
                return cand
    shipped = sorted({q.stem for d in CONFIG_DIRS if d.is_dir() for q in d.glob("*.json")
                      if not q.stem.startswith("deepspeed")})
    raise ConfigError(f"config {config!r} is neither a file nor a shipped config; fix: pass a config.json "
                      f"path or one of: {', '.join(shipped) or 'none found'}")

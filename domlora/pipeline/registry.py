"""Registry of dominant modules: probe a backbone once, reuse its `dom` module across tasks.

The paper finds the dominant module "architecture-dependent, task-stable", so PAGE need not
be rerun for every task. The registry is a small JSON file (default
`registry/dominant_modules.json`) keyed by model id + config hash; each entry keeps the `dom`
module and the evidence from every probe recorded for it (which probe set, its share of PAGE,
the argmax), so a disagreement between tasks stays visible (`stable: false`).

    entry = lookup("embedded", config_hash(model), path=...)
    if entry is None or reprobe: doc = <run PAGE>; entry = record(doc, model_id=..., config_hash=...)
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from domlora.errors import ConfigError
from domlora.io import file_lock, read_json, write_json
from domlora.placement import Placement

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path("registry") / "dominant_modules.json"
FORMAT_VERSION = 1


@dataclass
class RegistryEntry:
    """The dominant module of one backbone and the probes behind it."""

    model: str
    config_hash: str
    dominant: str
    """the `dom` most probes agree on (ties: the earliest recorded)"""
    stable: bool
    """every recorded probe picked the same `dom`"""
    observations: list[dict] = field(default_factory=list)
    """one per recorded probe: data, n_samples, dominant, argmax, shares, recorded_at"""

    @property
    def key(self) -> str:
        return entry_key(self.model, self.config_hash)

    def to_dict(self) -> dict:
        return asdict(self)


def entry_key(model: str, config_hash: str) -> str:
    return f"{model}@{config_hash}"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    # note: the lock lives in the temp folder, keyed by the registry's absolute path, so no lock file
    # sits beside a registry that is kept in git
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with file_lock(Path(tempfile.gettempdir()) / f"domlora-registry-{key}.lock"):
        yield


def load_registry(path: str | os.PathLike = DEFAULT_PATH) -> dict:
    """The whole registry file (an empty one if it does not exist yet).

    Raises:
        ConfigError: the file is not a registry (bad JSON or schema).
    """
    p = Path(path)
    if not p.exists():
        return {"format_version": FORMAT_VERSION, "entries": {}}
    try:
        doc = read_json(p)
    except ValueError as exc:
        raise ConfigError(f"registry {p} is not valid JSON ({exc}); fix: repair or delete it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise ConfigError(f"{p} is not a dominant-module registry (no `entries` object); fix: point --registry "
                          "at a file written by domlora, or at a new path")
    return doc


def _entry(d: dict) -> RegistryEntry:
    return RegistryEntry(model=d["model"], config_hash=d["config_hash"], dominant=d["dominant"],
                         stable=bool(d.get("stable", True)), observations=list(d.get("observations", [])))


def lookup(model: str, config_hash: str, *, path: str | os.PathLike = DEFAULT_PATH,
           match_config: bool = False) -> RegistryEntry | None:
    """The entry for this backbone, or None.

    Args:
        model: the model id as the pipeline names it (`embedded`, `Qwen/Qwen3-8B`, a folder).
        config_hash: `models.config_hash(model)`.
        match_config: if there is no entry for this id, accept one recorded for another id with the
            same config hash (the same architecture under another name); it is logged.
    """
    entries = load_registry(path)["entries"]
    hit = entries.get(entry_key(model, config_hash))
    if hit is not None:
        return _entry(hit)
    if match_config:
        same = [e for e in entries.values() if e.get("config_hash") == config_hash]
        if same:
            logger.info("registry: no entry for %s; using %s (same config hash %s)", model, same[0]["model"],
                        config_hash)
            return _entry(same[0])
    return None


def _observation(page_doc: dict, data: str | None) -> dict:
    dom = page_doc.get("dominant")
    if not dom:
        raise ConfigError("the probe result has no `dominant` module (no down_proj in this model), so there is "
                          "nothing to record; fix: record only page.json files of models with FFN down projections")
    mods = page_doc.get("modules", {})
    obs = {"data": data if data is not None else page_doc.get("data"), "n_samples": page_doc.get("n_samples"),
           "dominant": dom, "argmax": page_doc.get("argmax"),
           "dominant_layer": mods.get(dom, {}).get("layer"),
           "dominant_share_total": page_doc.get("dominant_share_total"),
           "dominant_share_type": page_doc.get("dominant_share_type"),
           "alpha": page_doc.get("alpha"), "rank": page_doc.get("rank")}
    boot = page_doc.get("bootstrap") or {}
    if boot:  # how often resampled probe sets pick the same dom / argmax
        obs |= {"dominant_bootstrap": boot.get("dom_stability"), "argmax_bootstrap": boot.get("argmax_stability")}
    return obs | {"recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def record(page_doc: dict, *, model: str, config_hash: str, path: str | os.PathLike = DEFAULT_PATH,
           data: str | None = None, replace: bool = False) -> RegistryEntry:
    """Add a probe result (a `page.json` dict) to the registry and return the updated entry.

    Args:
        page_doc: what `domlora probe` wrote.
        model, config_hash: the backbone's key.
        data: which probe set it came from (default: the doc's `data`).
        replace: drop the earlier observations of this backbone (a re-probe that should win).

    Raises:
        ConfigError: a probe result without a `dominant` module, or a broken registry file.
    """
    obs = _observation(page_doc, data)
    p = Path(path)
    with _locked(p):
        doc = load_registry(p)
        key = entry_key(model, config_hash)
        old = doc["entries"].get(key)
        observations = [] if (old is None or replace) else list(old.get("observations", []))
        # the same probe set recorded again replaces its earlier observation
        observations = [o for o in observations if o.get("data") != obs["data"] or obs["data"] is None]
        observations.append(obs)
        votes = Counter(o["dominant"] for o in observations)
        best = max(votes.values())
        dominant = next(o["dominant"] for o in observations if votes[o["dominant"]] == best)
        entry = RegistryEntry(model=model, config_hash=config_hash, dominant=dominant, stable=len(votes) == 1,
                              observations=observations)
        if not entry.stable:
            logger.warning("registry: probes of %s disagree on the dominant module: %s", model, dict(votes))
        doc["entries"][key] = entry.to_dict()
        doc["format_version"] = FORMAT_VERSION
        write_json(p, doc)
    return entry


def dominant_for(model: str, config_hash: str, *, probe: Callable[[], dict], path: str | os.PathLike = DEFAULT_PATH,
                 reprobe: bool = False, data: str | None = None) -> tuple[RegistryEntry, bool]:
    """The registry's `dom` for this backbone, probing (and recording) only when needed.

    Args:
        probe: called with no arguments when there is no entry (or `reprobe`); returns a `page.json` dict.
        reprobe: probe even if the backbone is registered, and record the result.

    Returns:
        (entry, probed): probed is True when `probe` was called.
    """
    if not reprobe:
        entry = lookup(model, config_hash, path=path)
        if entry is not None:
            logger.info("registry: %s is registered; dominant module %s (%d probe(s))", model, entry.dominant,
                        len(entry.observations))
            return entry, False
    return record(probe(), model=model, config_hash=config_hash, path=path, data=data), True


def placement_from_entry(entry: RegistryEntry, modules: dict[str, dict] | None = None):
    """A `dom` Placement from a registry entry (checked against the model's module table if given).

    Raises:
        ConfigError: the registered module is not in `modules` (the registry belongs to another model).
    """
    if modules is not None and entry.dominant not in modules:
        raise ConfigError(f"the registry says {entry.dominant} for {entry.model}, but this model has no such "
                          "module; fix: re-probe (`reprobe`) or check the registry key")
    return Placement(strategy="dom", modules=[entry.dominant], model=entry.model,
                     evidence={"source": "registry", "key": entry.key, "stable": entry.stable,
                               "observations": entry.observations})

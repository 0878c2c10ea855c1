"""Stage results shared between hosts through the DVC remote, by DVC's own run-cache.

DVC keeps, for every stage it records, a run-cache entry: the stage's dvc.lock entry filed under
a hash of its command, dependencies and parameters (`.dvc/cache/runs/<key>/<entry>`). That entry
is the per-stage record a host needs: another host with the same commit computes the same key from
the same inputs, finds the entry on the remote, pulls the objects it names and checks them out,
which is what `dvc repro --pull` does. So:

- after a stage is computed on a host, `publish` pushes its outputs' objects to the remote and
  then its run-cache entry, the entry last: a stage counts as done on the remote only once all
  it produced is there, and an interrupted push leaves it "not done" (never half done);
- before a stage runs anywhere, `restore` brings back from the remote what it depends on and,
  when the remote already has the stage itself, the stage (its outputs checked out, its dvc.lock
  entry written), so nothing is computed twice;
- a host's dvc.lock holds exactly the entries of what it computed or restored, each the run-cache
  entry's copy, so any host that restores the whole grid (the report's host) writes the one
  record, the same one `dvc pull --run-cache && dvc repro --pull` rebuilds on a fresh clone.

A remote that does not answer is waited for (`Remote.wait_s`), then reported as
`RemoteUnavailable`; what was computed stays recorded on the host and is pushed by the next run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from domlora.errors import ConfigError

logger = logging.getLogger(__name__)

DVC_LOCK = threading.Lock()
"""one DVC operation at a time in this process (DVC's own lock keeps other processes out)"""
Outcome = Literal["current", "local", "restored", "missing"]


class RemoteUnavailable(RuntimeError):
    """The DVC remote did not answer within the wait; the message names it and what is affected."""


@dataclass(frozen=True)
class Remote:
    """The DVC remote the hosts share."""

    name: str
    """the remote's name in DVC's config (`dvc remote add -d NAME URL`)"""
    url: str
    """where it is (s3://..., ssh://..., a folder)"""
    wait_s: float = 600.0
    """how long a push or pull waits for a remote that does not answer before it fails"""


@dataclass
class Restored:
    """What `restore` found for each stage, and the bytes it brought back."""

    outcomes: dict[str, Outcome]
    bytes: int = 0

    @property
    def missing(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o == "missing"]


def default_remote(root: str | os.PathLike, *, wait_s: float = 600.0) -> Remote | None:
    """The repository's default DVC remote (`core.remote`), or None when none is configured."""
    from dvc.config import Config

    conf = Config(dvc_dir=str(Path(root) / ".dvc"), validate=False)
    name = conf.get("core", {}).get("remote")
    if not name:
        return None
    url = conf.get("remote", {}).get(name, {}).get("url")
    if not url:  # DVC gives a relative folder resolved already
        return None
    return Remote(name=name, url=url, wait_s=wait_s)


def require_remote(root: str | os.PathLike, *, wait_s: float = 600.0) -> Remote:
    """The default DVC remote; a clear error when there is none (hosts share results through it).

    Raises:
        ConfigError: no default remote in .dvc/config or .dvc/config.local.
    """
    remote = default_remote(root, wait_s=wait_s)
    if remote is None:
        raise ConfigError(f"no default DVC remote in {Path(root).resolve()}: hosts share stage results through one; "
                          "add it once and commit .dvc/config (`dvc remote add -d store s3://BUCKET/domlora`), "
                          "or per host with `dvc remote add --local -d store URL`")
    return remote


# ------------------------------------------------------------------------------------------
# a DVC repository, held by one thread of this process and, through DVC's lock, by no other dvc
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _repo(root: str | os.PathLike):
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    with DVC_LOCK, contextlib.chdir(root):  # DVC resolves stage targets against the working directory
        for attempt in range(30):
            repo = Repo(".")
            held = lock_repo(repo)
            try:
                held.__enter__()
            except LockError:
                repo.close()
                if attempt == 29:
                    raise
                time.sleep(min(2 + attempt, 10))  # another dvc (a user's `dvc repro`?) holds the lock
                continue
            try:
                yield repo
            finally:
                held.__exit__(None, None, None)
                repo.close()
            return


def stage_name(stage) -> str:
    """A stage's address in its repository (`train@x`), whatever the working directory."""
    path = getattr(stage, "path_in_repo", None)
    name = getattr(stage, "name", None)
    if name and path == "dvc.yaml":
        return name
    return f"{path}:{name}" if name else str(path)


def _target(root, name: str) -> str:
    """`name` as a DVC target that does not depend on the working directory."""
    path, _, stage = name.rpartition(":") if ":" in name else ("dvc.yaml", "", name)
    return f"{Path(root).resolve() / path}:{stage}"


def _stages(repo) -> dict:
    return {stage_name(s): s for s in repo.index.stages}


def _odb(repo):
    """The remote's legacy object store: DVC files run-cache entries under its `runs/`."""
    return repo.cloud.get_remote_odb(None, "push --run-cache", hash_name="md5-dos2unix")


def _probe(odb) -> None:
    """Raise unless the remote answers (a local folder remote must exist: an unmounted share must
    not be filled on the local disk)."""
    from dvc.fs import LocalFileSystem

    if isinstance(odb.fs, LocalFileSystem):
        if not os.path.isdir(odb.path):
            raise OSError(f"remote folder {odb.path} is not there")
        return
    try:
        odb.fs.ls(odb.path)
    except FileNotFoundError:  # an object store with nothing under the prefix yet
        pass


def _key(stage) -> str:
    from dvc.stage.cache import _get_stage_hash

    return _get_stage_hash(stage)


def _entry_value(stage) -> str:
    from dvc.stage.cache import _get_cache_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    return _get_cache_hash(to_single_stage_lockfile(stage))


def _remote_entries(odb, key: str) -> list[str]:
    path = odb.fs.join(odb.path, "runs", key[:2], key)
    try:
        return [p for p in odb.fs.ls(path, detail=False) if not odb.fs.name(p).startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fetch_entry(repo, odb, key: str) -> bool:
    """Copy the remote's run-cache entry for `key` into the local run-cache, as the newest one there
    (DVC restores from the newest); False when the remote has none."""
    entries = _remote_entries(odb, key)
    if not entries:
        return False
    if len(entries) > 1:  # two hosts computed the same stage: every host picks the same one
        entries.sort(key=lambda p: (_mtime(odb.fs, p), odb.fs.name(p)))
    src = entries[-1]
    local = Path(repo.stage_cache._get_cache_path(key, odb.fs.name(src)))
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
        odb.fs.get_file(src, str(tmp))
        os.replace(tmp, local)
    os.utime(local)
    return True


def _mtime(fs, path: str) -> float:
    try:
        info = fs.info(path)
    except OSError:
        return 0.0
    t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def _out_bytes(stage) -> int:
    n = 0
    for out in stage.outs:
        size = getattr(out.meta, "size", None) if out.meta else None
        n += size or 0
    return n


# ------------------------------------------------------------------------------------------
# what the orchestrator calls
# ------------------------------------------------------------------------------------------

_NOT_AN_OUTAGE = (ConfigError, KeyError, ImportError, AttributeError, TypeError, NameError, AssertionError)


def _waiting(remote: Remote, what: str, fn):
    """Run `fn` until it succeeds or the remote has been unreachable for `remote.wait_s`."""
    deadline = time.monotonic() + remote.wait_s
    delay = 1.0
    from dvc.exceptions import NoOutputOrStageError
    from dvc.stage.exceptions import StageFileDoesNotExistError, StagePathOutsideError

    while True:
        try:
            return fn()
        except (*_NOT_AN_OUTAGE, NoOutputOrStageError, StagePathOutsideError, StageFileDoesNotExistError):
            raise
        except Exception as exc:  # network, permissions, a remote folder gone: wait for it
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteUnavailable(
                    f"{what}: the DVC remote '{remote.name}' ({remote.url}) did not answer for "
                    f"{remote.wait_s:.0f} s ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                    "what was computed stays recorded on this host and is pushed by the next run") from exc
            logger.warning("%s: remote %s not answering (%s); retrying in %.0f s", what, remote.url,
                           str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def restore(root: str | os.PathLike, names: list[str], *, remote: Remote, check_remote: bool = False) -> Restored:
    """Bring stages up to date from the remote, in the given (upstream first) order.

    A stage is `current` when this host has it as dvc.lock says, `restored` when the remote had it
    (its outputs are checked out and its dvc.lock entry written), `missing` otherwise (not
    computed yet, pushed only in part, or a stage it depends on is missing). With
    `check_remote`, a stage this host has but the remote lacks (its push failed) is `local`.
    Nothing is computed.

    Raises:
        RemoteUnavailable: the remote did not answer for `remote.wait_s`.
    """
    def go() -> Restored:
        res = Restored({})
        with _repo(root) as repo:
            odb = _odb(repo)
            _probe(odb)
            by_name = _stages(repo)
            for name in names:
                res.outcomes[name], n = _restore_one(repo, odb, by_name[name], set(res.missing), check_remote)
                res.bytes += n
        return res

    return _waiting(remote, f"restoring {len(names)} stages", go)


def _restore_one(repo, odb, stage, missing_upstream: set[str], check_remote: bool) -> tuple[Outcome, int]:
    from dvc.exceptions import DvcException
    from dvc.stage.cache import RunCacheNotFoundError, _can_hash

    if not stage.changed():
        if check_remote and _can_hash(stage) and not _remote_entries(odb, _key(stage)):
            return "local", 0
        return "current", 0
    if any(stage_name(d) in missing_upstream for d in repo.index.graph.successors(stage)):
        return "missing", 0
    try:
        # the key from a fresh copy: DVC's restore must see `stage` as dvc.lock has it
        probe = stage.reload()
        probe.save_deps()
        if not _can_hash(probe):
            return "missing", 0
        key = _key(probe)
        _fetch_entry(repo, odb, key)
        repo.stage_cache.restore(stage, pull=True)
    except RunCacheNotFoundError:
        return "missing", 0
    except DvcException as exc:  # e.g. a dependency not on this host
        logger.debug("%s not restorable: %s", stage_name(stage), exc)
        return "missing", 0
    stage.save(run_cache=False)
    stage.dump(update_pipeline=False)
    if not _remote_entries(odb, key):  # from this host's own run-cache: the remote lacks it
        logger.info("%s restored from this host's run-cache", stage_name(stage))
        return "local", 0
    logger.info("%s restored from the remote", stage_name(stage))
    return "restored", _out_bytes(stage)


def _odb_has_entry(odb, key: str, value: str) -> bool:
    return odb.fs.exists(odb.fs.join(odb.path, "runs", key[:2], key, value))


def publish(root: str | os.PathLike, name: str, *, remote: Remote) -> int:
    """Push a recorded stage (after `dvc commit`): its outputs' objects, then its run-cache entry.

    The entry goes last, so the stage is done on the remote only once everything it names is
    there. Pushing again is cheap (DVC skips what the remote has). Returns the bytes of the
    stage's outputs.

    Raises:
        RemoteUnavailable: the remote did not answer for `remote.wait_s`.
    """
    def go() -> int:
        with _repo(root) as repo:
            odb = _odb(repo)
            _probe(odb)
            stage = _stages(repo)[name]
            repo.push(targets=[_target(root, name)])
            repo.stage_cache.save(stage)  # a no-op when `dvc commit` wrote it already
            key, value = _key(stage), _entry_value(stage)
            local = repo.stage_cache._get_cache_path(key, value)
            if not os.path.isfile(local):
                raise ConfigError(f"{name} has no run-cache entry after `dvc commit` (are its outputs cached?)")
            if not _odb_has_entry(odb, key, value):
                dst = odb.fs.join(odb.path, "runs", key[:2], key, value)
                tmp = odb.fs.join(odb.path, "runs", key[:2], key, f".{value}.tmp{os.getpid()}")
                odb.fs.makedirs(odb.fs.parent(dst), exist_ok=True)
                odb.fs.put_file(local, tmp)
                odb.fs.mv(tmp, dst)
            return _out_bytes(stage)

    n = _waiting(remote, f"pushing {name}", go)
    logger.info("%s pushed to %s (%d bytes of outputs)", name, remote.url, n)
    return n


def forget_here(root: str | os.PathLike, names: list[str]) -> None:
    """Delete these stages' outputs and dvc.lock entries on this host (not any run-cache entry), so that
    the next `restore` takes the remote's newest result for them: after they are computed again elsewhere."""
    with _repo(root) as repo:
        by_name = _stages(repo)
        for name in names:
            stage = by_name[name]
            for out in stage.outs:
                if out.exists:
                    out.remove(ignore_remove=False)
            stage.dvcfile._lockfile.remove_stage(stage)

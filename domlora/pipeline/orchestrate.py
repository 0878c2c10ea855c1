"""Running grid stages as DVC-recorded steps, safely side by side.

The stages, their commands and their order come from DVC's own index of dvc.yaml
(`dvc_stages`), so an orchestrator never re-spells the pipeline. A stage runs as its own
process, with exactly the command dvc.yaml declares, so two cells can compute at once and a
crash in one cannot take the others down. DVC itself is only touched to ask whether a stage
is up to date (`dvc status`) and to record a finished one (`dvc commit`); those calls hold
DVC's repository lock for a moment, so they are serialised here (and retried if someone
else's `dvc` holds the lock), while the heavy work runs outside it.

Given a DVC remote (`remote.Remote`), a stage is shared between hosts: what it depends on is
restored from the remote first, a stage the remote already has is restored instead of computed,
and a computed one is pushed (outputs, then its run-cache entry) once recorded.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from domlora.pipeline.remote import DVC_LOCK as _DVC_LOCK
from domlora.pipeline.remote import Remote, publish, restore, stage_name

logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message carries the tail of its output."""


@dataclass(frozen=True)
class StageRef:
    """A DVC stage instance, the command that computes it and the stages it reads from."""

    name: str
    """DVC's address, e.g. `train@smol-arith-domlora-0`"""
    cmd: str
    """the command dvc.yaml declares, run by a shell in the repository root"""
    upstream: tuple[str, ...] = ()
    """names of the stages whose outputs it depends on"""

    @property
    def kind(self) -> str:
        """The stage definition it comes from: `train` for `train@...`."""
        return self.name.split("@", 1)[0]


def dvc_stages(root: str | os.PathLike) -> list[StageRef]:
    """Every stage of the repository's dvc.yaml, from DVC's own index, upstream stages first."""
    import networkx as nx
    from dvc.repo import Repo

    with _DVC_LOCK, Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return [StageRef(stage_name(s), s.cmd, tuple(sorted(stage_name(d) for d in graph.successors(s))))
                for s in order if s.cmd]


def with_upstream(stages: list[StageRef], targets) -> list[StageRef]:
    """`targets` (stage names) and everything they depend on, in the order of `stages`.

    Raises:
        ValueError: a target that is not a stage of dvc.yaml.
    """
    by_name = {s.name: s for s in stages}
    missing = [t for t in targets if t not in by_name]
    if missing:
        raise ValueError(f"not a stage of dvc.yaml: {missing[:5]} (is grid.yaml current? `domlora grid`)")
    keep: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].upstream)
    return [s for s in stages if s.name in keep]


def _dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    for attempt in range(30):
        with _DVC_LOCK:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                                  env=os.environ | {"DVC_NO_ANALYTICS": "1"})
        if proc.returncode == 0 or "Unable to acquire lock" not in proc.stderr + proc.stdout:
            return proc
        time.sleep(min(2 + attempt, 10))  # another dvc (a user's `dvc repro`?) holds the lock
    return proc


def is_up_to_date(root: Path, stage: str) -> bool:
    """True when DVC has this stage with unchanged deps, params and outs."""
    proc = _dvc(root, "status", "--json", stage)
    if proc.returncode != 0:
        logger.warning("dvc status %s failed: %s", stage, proc.stderr.strip()[-300:])
        return False
    try:
        return json.loads(proc.stdout or "{}") == {}
    except json.JSONDecodeError:
        return False


def record(root: Path, stage: str) -> None:
    """Record a computed stage in dvc.lock and the cache (`dvc commit`)."""
    proc = _dvc(root, "commit", "--force", stage)
    if proc.returncode != 0:
        raise StageFailed(f"dvc commit {stage} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")


def run_stage(root: Path, ref: StageRef, *, env: dict | None = None, skip_if_current: bool = True,
              log_dir: Path | None = None, remote: Remote | None = None, needs: list[str] | tuple = ()) -> str:
    """Compute one stage in its own process unless DVC already has it.

    Args:
        root: the repository checkout.
        ref: the stage.
        env: extra environment for the stage's process.
        skip_if_current: skip a stage DVC has (False: compute it anyway, e.g. to check a result).
        log_dir: where the stage's output goes (default `.domlora_logs/`).
        remote: share through this DVC remote: restore `needs` and the stage itself from it, push
            what is computed (and what this host has but the remote lacks).
        needs: with `remote`, the stages it depends on, upstream first (`with_upstream`).

    Returns:
        `skipped` (DVC had it here), `restored` (from the remote) or `computed`.

    Raises:
        StageFailed: the stage failed, or with `remote` something it needs is nowhere.
        RemoteUnavailable: the remote did not answer (the stage stays recorded here).
    """
    if remote is not None:
        got = restore(root, [*needs, ref.name] if skip_if_current else list(needs), remote=remote,
                      check_remote=True)
        lacking = [n for n in needs if got.outcomes[n] == "missing"]
        if lacking:
            raise StageFailed(f"{ref.name} needs {', '.join(lacking)}, which neither this host nor the remote "
                              f"{remote.url} has: not computed yet, or its push did not finish")
        own = got.outcomes.get(ref.name, "missing")
        if own == "restored":
            return "restored"
        if own in ("current", "local"):
            if own == "local":  # recorded here by a run whose push failed: push it now
                publish(root, ref.name, remote=remote)
            logger.info("%s is up to date in DVC: skipped", ref.name)
            return "skipped"
    elif skip_if_current and is_up_to_date(root, ref.name):
        logger.info("%s is up to date in DVC: skipped", ref.name)
        return "skipped"
    log_dir = log_dir or (root / ".domlora_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{ref.name.replace('@', '__')}.log"
    # dvc.yaml's `python` is this interpreter, as under `dvc repro` in the same environment
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(ref.cmd, shell=True, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | {"PATH": path} | (env or {}))
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise StageFailed(f"{ref.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    record(root, ref.name)
    logger.info("%s computed in %.1f s and recorded", ref.name, time.perf_counter() - t0)
    if remote is not None:
        publish(root, ref.name, remote=remote)
    return "computed"

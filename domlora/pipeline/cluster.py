"""A grid spread over several hosts: what they must agree on, and how its stages are cut into units.

Before a cell starts, every host must run the same commit (the stage keys of DVC's run-cache
hash the code, so a host at another commit would compute stages nobody else can find), the
grid's host must have a DVC remote (`remote.require_remote`), and the MLflow tracking server
every host logs into must answer. Each check fails with a message that names both sides and
the fix.

The stages still to compute are cut into units, each run by one host: a cell's training and
evaluation together (the adapter stays where it was trained), any other heavy stage (a probe,
a base evaluation) alone. Light stages (data preparation, placement selection) run on the
grid's host, which also gathers everything for the report. The GPU hosts serve the cells first:
a unit no cell needs waits until every cell's unit has ended (`Schedule`).
"""
from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from domlora.errors import ConfigError

CELL_KINDS = ("train", "evaluate")
"""stage kinds that belong to a cell: one unit, on one host"""


def checkout_commit(root: str | Path) -> str:
    """The commit a checkout is at (`git rev-parse HEAD`).

    Raises:
        ConfigError: not a git checkout.
    """
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{root} is not a git checkout ({proc.stderr.strip()[:200]}); every host runs a clone "
                          "of the repository at the deployment's commit")
    return proc.stdout.strip()


def check_commit(root: str | Path, expected: str, *, what: str = "the deployment") -> str:
    """Refuse a checkout at another commit than `expected`; returns the commit.

    Raises:
        ConfigError: the commits differ (both are named, with the fix).
    """
    head = checkout_commit(root)
    if head != expected:
        raise ConfigError(f"this host's checkout {Path(root).resolve()} is at commit {head[:12]}, but {what} runs "
                          f"commit {expected[:12]}: bring the host to it (`git fetch && git checkout {expected[:12]}`), "
                          f"or redeploy from {head[:12]} (`prefect deploy --all`)")
    return head


def check_tracking_server(uri: str, *, timeout: float = 5.0) -> None:
    """Refuse a tracking URI that several hosts cannot share or that does not answer.

    Raises:
        ConfigError: a local store (sqlite, a folder: each host would keep its own) or a server that
            does not answer its `/health` endpoint.
    """
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking URI {uri!r} is a store on one host; hosts log into one MLflow server: start "
                          "`mlflow server` (see README, Scale-out) and set MLFLOW_TRACKING_URI=http://HOST:PORT on "
                          "the grid's worker, or turn tracking off (DOMLORA_TRACKING=off)")
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigError(f"the MLflow tracking server {uri} does not answer ({problem}): start it (README, Scale-out), "
                      "fix MLFLOW_TRACKING_URI, or turn tracking off (DOMLORA_TRACKING=off)")


def host_id(root: str | Path) -> str:
    """Where a unit ran: host name and checkout."""
    return f"{socket.gethostname()}:{Path(root).resolve()}"


@dataclass(frozen=True)
class Unit:
    """Stages that one host computes, in DVC's order."""

    name: str
    """the cell id for a cell's stages, else the stage's name"""
    stages: tuple[str, ...]
    on_gpu: bool
    """sent to the GPU hosts (heavy stages), else computed on the grid's host"""


def plan_units(order: list[str], todo: set[str], *, heavy: frozenset[str]) -> list[Unit]:
    """Cut the stages still to compute (`todo`, names of `order`) into units, in `order`.

    Args:
        order: every stage name of the grid, upstream first (`dvc_stages`).
        todo: the ones to compute.
        heavy: stage kinds that need a GPU host.
    """
    units: dict[str, list[str]] = {}
    gpu: dict[str, bool] = {}
    for name in order:
        if name not in todo:
            continue
        kind, _, suffix = name.partition("@")
        key = suffix if kind in CELL_KINDS and suffix else name
        units.setdefault(key, []).append(name)
        gpu[key] = gpu.get(key, False) or kind in heavy
    return [Unit(k, tuple(v), gpu[k]) for k, v in units.items()]


@dataclass(frozen=True)
class Schedule:
    """Units in the order to send them, what each waits for, and which wait for every cell's unit."""

    units: list[Unit]
    after: dict[str, set[str]]
    """unit name -> names of the units computing stages it depends on"""
    late: set[str]
    """units no cell needs (a base evaluation, a probe only the report compares), and what depends on them"""

    @property
    def cells(self) -> list[str]:
        return [u.name for u in self.units if u.stages[0].split("@", 1)[0] in CELL_KINDS]


def schedule(units: list[Unit], upstream: dict[str, tuple[str, ...]]) -> Schedule:
    """Order `units` (given in DVC's order) so that the GPU hosts serve the cells first.

    Args:
        units: from `plan_units`.
        upstream: every stage's direct upstream stages (`StageRef.upstream`).
    """
    unit_of = {n: u for u in units for n in u.stages}
    cells = [u for u in units if u.stages[0].split("@", 1)[0] in CELL_KINDS]
    for_cells: set[str] = set()
    todo = [n for u in cells for n in u.stages]
    while todo:
        n = todo.pop()
        if n not in for_cells:
            for_cells.add(n)
            todo.extend(upstream.get(n, ()))
    after = {u.name: {unit_of[up].name for n in u.stages for up in upstream.get(n, ())
                      if up in unit_of and unit_of[up].name != u.name} for u in units}
    late: list[Unit] = []
    for u in units:  # in DVC's order: what a unit waits for is decided before it
        if (u.on_gpu and u not in cells and not set(u.stages) & for_cells) or after[u.name] & {x.name for x in late}:
            late.append(u)
    return Schedule([u for u in units if u not in late] + late, after, {u.name for u in late})

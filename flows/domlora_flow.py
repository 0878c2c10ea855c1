"""Prefect flow `domlora`: the grid, one task per DVC stage, recorded in DVC.

The stages, their commands and their dependencies are read from dvc.yaml through DVC's own index
(`domlora.pipeline.orchestrate.dvc_stages`), so the flow and `dvc repro` cannot drift; each task
is named after its DVC stage (`train@smol-arith-domlora-0`), so the Prefect UI reads like `dvc dag`.
Heavy stages (probe, train, evaluate) hold a slot of the `domlora-gpu` global concurrency limit,
which alone bounds how many run at once.

With `spread=True` the grid runs over several hosts: the stages still to compute are cut into
units (a cell's training + evaluation, a probe, a base evaluation), each a flow run of the
`domlora-stages/gpu` deployment that whichever GPU host's worker is free picks up; hosts share
results through the DVC remote (`domlora.pipeline.remote`), log into one MLflow server, and this
flow's host gathers everything from the remote and writes the report (see flows/README.md).

Run as: prefect deployment run domlora/full-grid -p profile=embedded
   or:  prefect deployment run domlora/cluster-grid       (spread over the GPU hosts' workers)
   or:  python -m flows.domlora_flow --profile embedded   (local, ephemeral Prefect)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import allow_failure

from domlora.pipeline.cluster import (Unit, check_commit, check_tracking_server, checkout_commit, host_id,
                                      plan_units, schedule)
from domlora.pipeline.grid import check_grid
from domlora.pipeline.orchestrate import StageFailed, StageRef, dvc_stages, run_stage, with_upstream
from domlora.pipeline.params import Cell, load_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.remote import Remote, default_remote, forget_here, require_remote, restore
from domlora.pipeline.tracking import PENDING, make_tracker

GPU_SLOTS = "domlora-gpu"  # global concurrency limit: how many heavy stages may run at once
# A slot is leased and the lease renewed while its stage runs; the slots of a run that was killed
# come back when the lease runs out (Prefect's default, 300 s, left a rerun idle for 5 minutes).
SLOT_LEASE_S = 60
HEAVY = frozenset({"probe", "select", "sweep", "train", "evaluate", "evaluate_base", "checkpoints"})
"""stage kinds that load a model (select: for the placement peers) and hold a slot"""
DEFAULT_SLOTS = 2
"""the slots scripts/prefect_up.sh creates unless DOMLORA_GPU_SLOTS says otherwise"""
STAGES_DEPLOYMENT = "domlora-stages/gpu"
"""where a spread grid sends its units: the GPU hosts' workers serve its work queue"""


def _share_cpu_threads(parallel: int) -> None:
    """On a CPU-only machine, split the cores among the stages that run side by side.

    Two stages with a torch thread per core each on the same cores wait on each other at every
    small matmul; one share each is several times faster. OMP_NUM_THREADS set by the user wins.
    """
    import torch

    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    n = str(max(1, (os.cpu_count() or 1) // max(1, parallel)))
    os.environ["OMP_NUM_THREADS"] = n  # the stages' child processes inherit it
    os.environ.setdefault("MKL_NUM_THREADS", n)


def _slots() -> int:
    """The size of the `domlora-gpu` limit (what bounds parallel heavy stages), for the CPU split."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return int(client.read_global_concurrency_limit_by_name(GPU_SLOTS).limit)
    except Exception:  # no such limit yet (ephemeral runs): the default the setup script creates
        return int(os.environ.get("DOMLORA_GPU_SLOTS", DEFAULT_SLOTS))


@task(name="stage", retries=1, retry_delay_seconds=10, task_run_name="{stage}")
def run_dvc_stage(stage: str, cmd: str, root: str, grid_id: str, remote: Remote | None = None,
                  needs: list[str] | None = None, slot: bool = True, force: bool = False,
                  env: dict | None = None) -> str:
    """Compute one DVC stage unless DVC (here, or on the remote) has it; a heavy one holds a `domlora-gpu`
    slot unless `slot` is off (on a GPU host, its worker's limit bounds the stages instead)."""
    ref = StageRef(stage, cmd)
    kw = {"env": {"DOMLORA_GRID_ID": grid_id} | (env or {}), "remote": remote, "needs": needs or (),
          "skip_if_current": not force}
    if slot and ref.kind in HEAVY:
        with concurrency(GPU_SLOTS, occupy=1, strict=False, lease_duration=SLOT_LEASE_S):
            return run_stage(Path(root), ref, **kw)
    return run_stage(Path(root), ref, **kw)


class UnitLost(RuntimeError):
    """A unit's flow run crashed (its host or worker went away): it is sent again, to any GPU host."""


def _lost(task, task_run, state) -> bool:
    """Retry a unit only when its host was lost; a stage that failed would fail again."""
    return isinstance(getattr(state, "data", None), UnitLost) or "UnitLost" in (state.message or "")


@task(name="unit", retries=2, retry_delay_seconds=5, retry_condition_fn=_lost, task_run_name="{unit}")
def dispatch(unit: str, stages: list[str], commit: str, grid_id: str, tracking_uri: str | None,
             remote_wait_s: float, force: list[str]) -> dict:
    """Have a GPU host compute a unit (a flow run of `domlora-stages/gpu`); returns where and what it did."""
    from prefect.deployments import run_deployment

    run = run_deployment(STAGES_DEPLOYMENT, flow_run_name=unit, poll_interval=2, timeout=None, parameters={
        "stages": stages, "commit": commit, "grid_id": grid_id, "tracking_uri": tracking_uri,
        "remote_wait_s": remote_wait_s, "force": force})
    state = run.state
    if state.is_completed():
        return parse_unit_message(state.message or "")
    if state.is_crashed():
        raise UnitLost(f"{unit}: flow run {run.name} crashed ({state.message}); sending it again")
    raise StageFailed(f"{unit} {state.name.lower()} (flow run {run.name}): {state.message}")


def unit_message(host: str, outcomes: dict[str, str]) -> str:
    """The final message of a unit's flow run: where it ran and what each stage did."""
    return f"{host} | " + ", ".join(f"{n}={o}" for n, o in outcomes.items())


def parse_unit_message(message: str) -> dict:
    host, _, rest = message.partition(" | ")
    return {"host": host, "stages": dict(x.split("=", 1) for x in rest.split(", ") if "=" in x)}


@flow(name="domlora-stages", log_prints=True)
def domlora_stages(stages: list[str], commit: str, grid_id: str, root: str = ".", tracking_uri: str | None = None,
                   remote_wait_s: float = 600, force: list[str] | None = None):
    """Compute some stages of a grid on this host (a GPU host's worker runs this for a spread grid).

    What they need comes from the DVC remote, what they produce goes to it, so any host can run any
    unit; a host whose checkout is not at the grid's commit refuses before anything starts.

    Args:
        stages: the DVC stages to compute, e.g. a cell's `train@...` and `evaluate@...`.
        commit: the commit the grid runs; this checkout must be at it.
        grid_id: the grid execution (its MLflow parent run).
        root: this host's checkout (the deployment's working directory).
        tracking_uri: the MLflow server every host logs into (None: tracking off or from the environment).
        remote_wait_s: how long a push or pull waits for a remote that does not answer.
        force: stages to compute even if the remote has them.
    """
    log = get_run_logger()
    root = str(Path(root).resolve())
    check_commit(root, commit)
    remote = require_remote(root, wait_s=remote_wait_s)
    every = dvc_stages(root)
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    host = host_id(root)
    log.info("%s: %s on %s", grid_id, ", ".join(stages), host)
    outcomes = {}
    for s in with_upstream(every, stages):
        if s.name in stages:
            needs = [u.name for u in with_upstream(every, [s.name]) if u.name != s.name]
            outcomes[s.name] = run_dvc_stage(s.name, s.cmd, root, grid_id, remote=remote, needs=needs, slot=False,
                                             force=s.name in (force or ()), env=env)
    layout = Layout(root)
    pending = sorted({n.split("@", 1)[1] for n in stages if n.split("@", 1)[0] in ("train", "evaluate")
                      and (layout.run_dir(n.split("@", 1)[1]) / PENDING).exists()})
    if pending:
        log.warning("tracking of %s failed on %s: results are on disk and on the remote; run "
                    "`domlora sync --grid-id %s` when the server is back", ", ".join(pending), host, grid_id)
    return Completed(message=unit_message(host, outcomes))


def grid_targets(params, *, models=None, datasets=None, methods=None, seeds=None, tables=None) -> list[str]:
    """The DVC stages that finish the chosen cells and their base evaluations (the report comes after them:
    it reads whatever is there, so its own DVC dependencies, the whole grid, are not pulled in)."""
    if tables:
        methods = [m for m in params.methods_in_tables(tables) if not methods or m in methods]
    cells = params.cells(models=models, datasets=datasets, methods=methods, seeds=seeds)
    targets = [f"{kind}@{c.id}" for c in cells for kind in ("train", "evaluate")]
    targets += sorted({f"evaluate_base@{c.model}-{c.dataset}" for c in cells})
    # every probe set of the chosen models (the report compares them), unless datasets were picked
    probe_sets = datasets or params.grid.probe_datasets
    used = list(dict.fromkeys(c.model for c in cells))
    probed = used if (models or datasets or methods or tables) else params.grid.probe_models
    targets += [f"probe@{m}-{d}" for m in probed for d in probe_sets]
    # the Figure 2 study of those models, with the whole grid or its tables
    if not (datasets or methods):
        targets += [f"checkpoints@{m}-{d}" for m, d in params.checkpoint_studies() if m in used]
    return targets


@flow(name="domlora", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def domlora(profile: str | None = None, root: str = ".", models: list[str] | None = None,
            datasets: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
            tables: list[int] | None = None, spread: bool = False, force: list[str] | None = None,
            remote_wait_s: float = 600):
    """Run the grid of a profile (or a subset of it): every DVC stage it needs, in DVC's order.

    Args:
        profile: a profile in params.yaml; it must be the active one (`run:`), since DVC records the
            active profile's stages (`domlora profile use NAME` switches).
        root: the repository checkout to run in.
        models, datasets, methods, seeds: a subset of the grid (default: all of it).
        tables: only methods that belong to these paper tables (e.g. [5] for the ablations).
        spread: send the heavy stages to the GPU hosts' workers (`domlora-stages/gpu`), sharing results
            through the DVC remote (required) and one MLflow server (required unless tracking is off).
        force: cells (ids) or stages to compute again even where DVC or the remote has them.
        remote_wait_s: how long a push or pull waits for a DVC remote that does not answer.
    """
    log = get_run_logger()
    root = str(Path(root).resolve())
    params = load_params(Path(root) / "params.yaml")
    if profile and profile != params.profile:
        raise ValueError(f"profile {profile!r} is not the active one ({params.profile!r}); "
                         f"run `domlora profile use {profile}` in {root} first")
    check_grid(params, root)
    # with a remote (required when spread), results are shared: a stage the remote has counts as done
    remote = (require_remote(root, wait_s=remote_wait_s) if spread
              else default_remote(root, wait_s=remote_wait_s))
    commit = None
    if spread:
        commit = checkout_commit(root)
        deployed = _deployment_commit()
        if deployed:
            check_commit(root, deployed)
    every = dvc_stages(root)
    stages = with_upstream(every, grid_targets(params, models=models, datasets=datasets, methods=methods,
                                                seeds=seeds, tables=tables))
    report = next(s for s in every if s.name == "report")
    forced = _forced(force, {s.name for s in stages})
    grid_id = f"prefect-{flow_run.get_id() or 'local'}"
    tracker = make_tracker(params, grid_id=grid_id)
    env = {}
    if spread and tracker.enabled:
        env["MLFLOW_TRACKING_URI"] = tracker.uri
        check_tracking_server(tracker.uri)
        tracker.parent_run_id()  # the grid's one parent run, before any host logs a cell under it
    if spread:
        _check_deployment(STAGES_DEPLOYMENT)
    else:
        _share_cpu_threads(_slots())
    log.info("grid %s: %d DVC stages of profile %s, then the report%s%s", grid_id, len(stages), params.profile,
             f"; shared through DVC remote {remote.name} ({remote.url})" if remote else "",
             f"; spread over the workers of {STAGES_DEPLOYMENT} at commit {commit[:12]}" if spread else "")
    units: dict[str, dict] = {}
    if spread:
        futures = _spread(stages, root=root, grid_id=grid_id, remote=remote, commit=commit, forced=forced,
                          tracking_uri=env.get("MLFLOW_TRACKING_URI"), units=units)
    else:
        futures = {}
        for s in stages:
            needs = [u.name for u in with_upstream(stages, [s.name]) if u.name != s.name] if remote else None
            futures[s.name] = run_dvc_stage.submit(s.name, s.cmd, root, grid_id, remote=remote, needs=needs,
                                                   force=s.name in forced,
                                                   wait_for=[futures[u] for u in s.upstream if u in futures])
    wait(list(futures.values()))
    errors = {n: (f.state.message or f.state.name) for n, f in futures.items() if not f.state.is_completed()}
    if spread:  # gather every host's results here: the one record (dvc.lock) and the report's inputs
        got = restore(root, [s.name for s in stages], remote=remote)
        for n in got.missing:
            errors.setdefault(n, "not on the DVC remote after its unit ran")
        log.info("gathered from the remote: %s (%.1f MB)", _count(got.outcomes), got.bytes / 1e6)
    # the report shows what finished and what did not: it runs after every stage, failed ones included
    run_dvc_stage.submit(report.name, report.cmd, root, grid_id, env=env,
                         wait_for=[allow_failure(f) for f in futures.values()]).wait()
    failed_cells = sorted({n.split("@", 1)[1] for n in errors if n.split("@", 1)[0] in ("train", "evaluate")})
    for cid in failed_cells:
        why = next(e for n, e in errors.items() if n.endswith(f"@{cid}"))
        log.error("cell %s failed: %s", cid, why[:2000])
        tracker.mark_failed(cell=Cell.parse(cid), error=why)
    done = sorted({s.name.split("@", 1)[1] for s in stages if s.kind == "evaluate"} - set(failed_cells))
    summary = {"grid_id": grid_id, "stages": len(stages) + 1, "succeeded": done, "failed": failed_cells}
    if spread:
        summary["units"] = units
    log.info("grid summary: %s", summary)
    if failed_cells:
        return Failed(message=f"{len(failed_cells)} cells failed: {', '.join(failed_cells)}", data=summary)
    return Completed(message=f"{len(done)} cells done", data=summary)


def _spread(stages: list[StageRef], *, root: str, grid_id: str, remote: Remote, commit: str, forced: set[str],
            tracking_uri: str | None, units: dict) -> dict:
    """Submit what is left of the grid: light stages here, heavy ones as units for the GPU hosts.

    Returns a future per stage; `units` receives, per unit, the host that ran it and what each stage did.
    """
    log = get_run_logger()
    order = [s.name for s in stages]
    by_name = {s.name: s for s in stages}
    if forced:  # this host takes them from the remote once they are computed again
        forget_here(root, sorted(forced))
    survey = restore(root, [n for n in order if n not in forced], remote=remote, check_remote=True)
    log.info("already done here or on the remote: %s (%.1f MB restored)", _count(survey.outcomes),
             survey.bytes / 1e6)
    local = {n for n, o in survey.outcomes.items() if o == "local" and n not in forced}  # only to be pushed
    todo = {n for n, o in survey.outcomes.items() if o == "missing"} | forced
    plan = plan_units(order, todo, heavy=HEAVY) + [Unit(n, (n,), False) for n in order if n in local]
    plan.sort(key=lambda u: order.index(u.stages[0]))
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    # the GPU hosts serve the cells first: a unit no cell needs (a base evaluation, a probe only the report
    # compares) is sent once every cell's unit has ended, so it never holds a host while a cell waits
    sched = schedule(plan, {s.name: s.upstream for s in stages})
    unit_futures: dict[str, object] = {}
    futures = {}
    for u in sched.units:
        wait_for = [unit_futures[a] for a in sorted(sched.after[u.name])]
        if u.name in sched.late:
            wait_for += [allow_failure(unit_futures[c]) for c in sched.cells]
        if u.on_gpu:
            fut = dispatch.submit(u.name, list(u.stages), commit, grid_id, tracking_uri, remote.wait_s,
                                  sorted(set(u.stages) & forced), wait_for=wait_for)
        else:
            (n,) = u.stages
            needs = [x.name for x in with_upstream(stages, [n]) if x.name != n]
            fut = run_dvc_stage.submit(n, by_name[n].cmd, root, grid_id, remote=remote, needs=needs, slot=False,
                                       force=n in forced, env=env, wait_for=wait_for)
        unit_futures[u.name] = fut
        for n in u.stages:
            futures[n] = fut
    log.info("%d units to compute: %d on the GPU hosts (%d after the cells), %d here", len(plan),
             sum(u.on_gpu for u in plan), len(sched.late), sum(not u.on_gpu for u in plan))
    wait(list(unit_futures.values()))
    for u in plan:
        fut = unit_futures[u.name]
        if fut.state.is_completed():
            res = fut.result()
            units[u.name] = res if u.on_gpu else {"host": host_id(root), "stages": {u.stages[0]: res}}
    return futures


def _forced(force: list[str] | None, names: set[str]) -> set[str]:
    """Stage names from `force` (cell ids stand for their training and evaluation)."""
    out = set()
    for f in force or ():
        hit = {n for n in names if n == f or n.split("@", 1)[-1] == f and n.split("@", 1)[0] in ("train", "evaluate")}
        if not hit:
            raise ValueError(f"force: {f!r} is neither a cell nor a stage of this grid")
        out |= hit
    return out


def _count(outcomes: dict[str, str]) -> str:
    from collections import Counter

    return ", ".join(f"{k} {v}" for k, v in sorted(Counter(outcomes.values()).items())) or "nothing"


def _deployment_commit() -> str | None:
    """The commit this flow run's deployment was made from (its version, set by prefect.yaml), if any."""
    import re

    from prefect.runtime import deployment

    version = deployment.version
    return version if version and re.fullmatch(r"[0-9a-f]{40}", version) else None


def _check_deployment(name: str) -> None:
    """Refuse to spread a grid when the units' deployment does not exist."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except Exception as exc:
        raise ValueError(f"deployment {name} not found ({type(exc).__name__}): deploy it from the repository "
                         "(`prefect --no-prompt deploy --all`, see README, Scale-out)") from exc


def main() -> None:
    p = argparse.ArgumentParser(description="Run the domlora grid locally (ephemeral Prefect).")
    p.add_argument("--profile", default=None)
    p.add_argument("--methods", default="", help="comma list")
    a = p.parse_args()
    domlora(profile=a.profile, methods=[m for m in a.methods.split(",") if m] or None)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()

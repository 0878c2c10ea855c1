"""Prefect flow `domlora`: the grid, one task per DVC stage, recorded in DVC.

The stages, their commands and their dependencies are read from dvc.yaml through DVC's own index
(`domlora.pipeline.orchestrate.dvc_stages`), so the flow and `dvc repro` cannot drift; each task
is named after its DVC stage (`train@smol-arith-domlora-0`), so the Prefect UI reads like `dvc dag`.
Heavy stages (probe, train, evaluate) hold a slot of the `domlora-gpu` global concurrency limit,
which alone bounds how many run at once.

Run as: prefect deployment run domlora/full-grid -p profile=embedded
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

from domlora.pipeline.grid import check_grid
from domlora.pipeline.orchestrate import StageRef, dvc_stages, run_stage, with_upstream
from domlora.pipeline.params import Cell, load_params
from domlora.pipeline.tracking import make_tracker

GPU_SLOTS = "domlora-gpu"  # global concurrency limit: how many heavy stages may run at once
# A slot is leased and the lease renewed while its stage runs; the slots of a run that was killed
# come back when the lease runs out (Prefect's default, 300 s, left a rerun idle for 5 minutes).
SLOT_LEASE_S = 60
HEAVY = frozenset({"probe", "select", "sweep", "train", "evaluate", "evaluate_base"})
"""stage kinds that load a model (select: for the placement peers) and hold a slot"""
DEFAULT_SLOTS = 2
"""the slots scripts/prefect_up.sh creates unless DOMLORA_GPU_SLOTS says otherwise"""


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
def run_dvc_stage(stage: str, cmd: str, root: str, grid_id: str) -> str:
    """Compute one DVC stage unless DVC has it (a heavy one holds a `domlora-gpu` slot)."""
    ref = StageRef(stage, cmd)
    env = {"DOMLORA_GRID_ID": grid_id}
    if ref.kind in HEAVY:
        with concurrency(GPU_SLOTS, occupy=1, strict=False, lease_duration=SLOT_LEASE_S):
            return run_stage(Path(root), ref, env=env)
    return run_stage(Path(root), ref, env=env)


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
    return targets + [f"probe@{m}-{d}" for m in dict.fromkeys(c.model for c in cells) for d in probe_sets]


@flow(name="domlora", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def domlora(profile: str | None = None, root: str = ".", models: list[str] | None = None,
            datasets: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
            tables: list[int] | None = None):
    """Run the grid of a profile (or a subset of it): every DVC stage it needs, in DVC's order.

    Args:
        profile: a profile in params.yaml; it must be the active one (`run:`), since DVC records the
            active profile's stages (`domlora profile use NAME` switches).
        root: the repository checkout to run in.
        models, datasets, methods, seeds: a subset of the grid (default: all of it).
        tables: only methods that belong to these paper tables (e.g. [5] for the ablations).
    """
    log = get_run_logger()
    root = str(Path(root).resolve())
    params = load_params(Path(root) / "params.yaml")
    if profile and profile != params.profile:
        raise ValueError(f"profile {profile!r} is not the active one ({params.profile!r}); "
                         f"run `domlora profile use {profile}` in {root} first")
    check_grid(params, root)
    every = dvc_stages(root)
    stages = with_upstream(every, grid_targets(params, models=models, datasets=datasets, methods=methods,
                                                seeds=seeds, tables=tables))
    report = next(s for s in every if s.name == "report")
    grid_id = f"prefect-{flow_run.get_id() or 'local'}"
    _share_cpu_threads(_slots())
    tracker = make_tracker(params, grid_id=grid_id)
    log.info("grid %s: %d DVC stages of profile %s, then the report", grid_id, len(stages), params.profile)
    futures = {}
    for s in stages:
        futures[s.name] = run_dvc_stage.submit(s.name, s.cmd, root, grid_id,
                                               wait_for=[futures[u] for u in s.upstream if u in futures])
    wait(list(futures.values()))
    # the report shows what finished and what did not: it runs after every stage, failed ones included
    run_dvc_stage.submit(report.name, report.cmd, root, grid_id,
                         wait_for=[allow_failure(f) for f in futures.values()]).wait()
    failed_cells = sorted({n.split("@", 1)[1] for n, f in futures.items()
                           if n.split("@", 1)[0] in ("train", "evaluate") and not f.state.is_completed()})
    for cid in failed_cells:
        bad = next(f.state for n, f in futures.items() if n.endswith(f"@{cid}") and not f.state.is_completed())
        log.error("cell %s failed: %s", cid, (bad.message or bad.name)[:2000])
        tracker.mark_failed(cell=Cell.parse(cid), error=bad.message or bad.name)
    done = sorted({n.split("@", 1)[1] for n in futures if n.startswith("evaluate@")} - set(failed_cells))
    summary = {"grid_id": grid_id, "stages": len(stages) + 1, "succeeded": done, "failed": failed_cells}
    log.info("grid summary: %s", summary)
    if failed_cells:
        return Failed(message=f"{len(failed_cells)} cells failed: {', '.join(failed_cells)}", data=summary)
    return Completed(message=f"{len(done)} cells done", data=summary)


def main() -> None:
    p = argparse.ArgumentParser(description="Run the domlora grid locally (ephemeral Prefect).")
    p.add_argument("--profile", default=None)
    p.add_argument("--methods", default="", help="comma list")
    a = p.parse_args()
    domlora(profile=a.profile, methods=[m for m in a.methods.split(",") if m] or None)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()

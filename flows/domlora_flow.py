"""Prefect flow `domlora`: the grid, one task per stage per cell, recorded in DVC.

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

from domlora.pipeline.params import load_params
from domlora.pipeline.orchestrate import StageRef, run_stage
from domlora.pipeline.tracking import make_tracker

GPU_SLOTS = "domlora-gpu"  # global concurrency limit: how many cells may train/evaluate at once
# A slot is leased and the lease renewed while its stage runs; the slots of a run that was killed
# come back when the lease runs out (Prefect's default, 300 s, left a rerun idle for 5 minutes).
SLOT_LEASE_S = 60


def _stage(ref: StageRef, root: str, grid_id: str, *, gpu: bool = False) -> str:
    env = {"DOMLORA_GRID_ID": grid_id}
    if gpu:
        with concurrency(GPU_SLOTS, occupy=1, strict=False, lease_duration=SLOT_LEASE_S):
            return run_stage(Path(root), ref, env=env)
    return run_stage(Path(root), ref, env=env)


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


@task(name="prepare_data", retries=1, retry_delay_seconds=5)
def prepare_data(dataset: str, root: str, grid_id: str) -> str:
    """Write a dataset's splits."""
    return _stage(StageRef(f"prepare_data@{dataset}", ("stages.prepare_data", "--dataset", dataset)), root, grid_id)


@task(name="probe", retries=1, retry_delay_seconds=5)
def probe(model: str, dataset: str, root: str, grid_id: str) -> str:
    """PAGE / NFN probe of a model on a probe set."""
    ref = StageRef(f"probe@{model}-{dataset}", ("stages.probe", "--model", model, "--dataset", dataset))
    return _stage(ref, root, grid_id, gpu=True)


@task(name="select", retries=1, retry_delay_seconds=2)
def select(model: str, dataset: str, method: str, root: str, grid_id: str) -> str:
    """A method's placement from the probe."""
    ref = StageRef(f"select@{model}-{dataset}-{method}",
                   ("stages.select", "--model", model, "--dataset", dataset, "--method", method))
    return _stage(ref, root, grid_id)


@task(name="train", retries=1, retry_delay_seconds=10)
def train(cell_id: str, root: str, grid_id: str) -> str:
    """Train a cell's adapter (resumes from its last checkpoint on retry)."""
    return _stage(StageRef(f"train@{cell_id}", ("stages.train", "--cell", cell_id)), root, grid_id, gpu=True)


@task(name="evaluate", retries=1, retry_delay_seconds=10)
def evaluate(cell_id: str, root: str, grid_id: str) -> str:
    """Evaluate a cell's adapter (a retry evaluates only the missing tasks)."""
    return _stage(StageRef(f"evaluate@{cell_id}", ("stages.evaluate", "--cell", cell_id)), root, grid_id, gpu=True)


@task(name="evaluate_base", retries=1, retry_delay_seconds=10)
def evaluate_base(model: str, dataset: str, root: str, grid_id: str) -> str:
    """Evaluate the base model on a dataset's tasks."""
    ref = StageRef(f"evaluate_base@{model}-{dataset}", ("stages.evaluate", "--base", f"{model}-{dataset}"))
    return _stage(ref, root, grid_id, gpu=True)


@task(name="report")
def report(root: str, grid_id: str) -> str:
    """Tables, figures and MLflow tables for the cells present."""
    return _stage(StageRef("report", ("stages.report",)), root, grid_id, )


@flow(name="domlora", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def domlora(profile: str | None = None, root: str = ".", models: list[str] | None = None,
            datasets: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
            tables: list[int] | None = None, max_parallel_cells: int = 2):
    """Run the grid of a profile (or a subset of it): prepare -> probe -> select -> train -> evaluate -> report.

    Args:
        profile: a profile in params.yaml; it must be the active one (`run:`), since DVC records the
            active profile's stages (`domlora profile use NAME` switches).
        root: the repository checkout to run in.
        models, datasets, methods, seeds: a subset of the grid (default: all of it).
        tables: only methods that belong to these paper tables (e.g. [5] for the ablations).
        max_parallel_cells: cells computed at once (on GPU machines, also cap with the
            `domlora-gpu` global concurrency limit).
    """
    log = get_run_logger()
    root = str(Path(root).resolve())
    params = load_params(Path(root) / "params.yaml")
    if profile and profile != params.profile:
        raise ValueError(f"profile {profile!r} is not the active one ({params.profile!r}); "
                         f"run `domlora profile use {profile}` in {root} first")
    if tables:
        methods = [m for m in (methods or params.grid.methods) if set(params.methods[m].tables) & set(tables)]
    cells = params.cells(models=models, datasets=datasets, methods=methods, seeds=seeds)
    grid_id = f"prefect-{flow_run.get_id() or 'local'}"
    _share_cpu_threads(max_parallel_cells)
    tracker = make_tracker(params, grid_id=grid_id)
    log.info("grid %s: %d cells of profile %s", grid_id, len(cells), params.profile)
    used_models = sorted({c.model for c in cells}, key=params.grid.models.index)
    used_data = sorted({c.dataset for c in cells}, key=params.grid.datasets.index)
    probe_sets = [d for d in params.grid.probe_datasets if d in used_data or not (datasets or models or methods)]

    prep = {d: prepare_data.submit(d, root, grid_id) for d in probe_sets}
    probes = {(m, d): probe.submit(m, d, root, grid_id, wait_for=[prep[d]]) for m in used_models for d in probe_sets}
    bases = [evaluate_base.submit(m, d, root, grid_id, wait_for=[prep[d]]) for m in used_models for d in used_data]
    finals, failed = [], []
    # cells go in waves of `max_parallel_cells`; within a wave they run side by side
    for i in range(0, len(cells), max_parallel_cells):
        wave = cells[i:i + max_parallel_cells]
        futs = []
        for c in wave:
            s = select.submit(c.model, c.dataset, c.method, root, grid_id, wait_for=[probes[(c.model, c.dataset)]])
            t = train.submit(c.id, root, grid_id, wait_for=[s])
            e = evaluate.submit(c.id, root, grid_id, wait_for=[t])
            futs.append((c, (s, t, e)))
        wait([f for _c, chain in futs for f in chain])
        for c, chain in futs:
            if chain[-1].state.is_completed():
                finals.append(c.id)
                continue
            failed.append(c.id)
            # the first stage that did not complete carries the error
            bad = next(f.state for f in chain if not f.state.is_completed())
            log.error("cell %s failed: %s", c.id, (bad.message or bad.name)[:2000])
            tracker.mark_failed(cell=c, error=bad.message or bad.name)
    wait(bases)
    rep = report.submit(root, grid_id, wait_for=[])
    rep.wait()
    summary = {"grid_id": grid_id, "cells": len(cells), "succeeded": finals, "failed": failed}
    log.info("grid summary: %s", summary)
    if failed:
        return Failed(message=f"{len(failed)}/{len(cells)} cells failed: {', '.join(failed)}", data=summary)
    return Completed(message=f"{len(finals)} cells done", data=summary)


def main() -> None:
    p = argparse.ArgumentParser(description="Run the domlora grid locally (ephemeral Prefect).")
    p.add_argument("--profile", default=None)
    p.add_argument("--methods", default="", help="comma list")
    p.add_argument("--max-parallel-cells", type=int, default=2)
    a = p.parse_args()
    domlora(profile=a.profile, methods=[m for m in a.methods.split(",") if m] or None,
            max_parallel_cells=a.max_parallel_cells)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()

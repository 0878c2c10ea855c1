"""One-time set-up of a Prefect server for a grid spread over hosts (scripts/cluster.sh server runs it):
the process work pool with its `grid` and `gpu` queues, the `domlora-gpu` concurrency limit, and the
automation that notices a lost host. Everything is created only when missing (one process, where the
Prefect CLI would take one per object).

The automation is Prefect's documented answer to a host that dies mid-run ("zombie" flow runs):
flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; a run that has sent
none for `--crash-after` seconds is marked Crashed, and the grid sends that unit again to any
GPU host's worker.

Run as: python -m flows.cluster_setup --crash-after 300 --gpu-slots 2
"""
from __future__ import annotations

import argparse
from datetime import timedelta

AUTOMATION = "domlora: crash flow runs without heartbeats"


def ensure_crash_automation(crash_after_s: float) -> str:
    """Create (or replace) the automation that marks silent flow runs Crashed; returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=AUTOMATION).delete()
    except Exception:  # not there yet
        pass
    automation = Automation(
        name=AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {crash_after_s:.0f} s: its host or worker went away")],
    ).create()
    return str(automation.id)


def ensure_pool(pool: str, queues: list[str], *, gpu_slots: int) -> None:
    """The process work pool, its queues and the GPU-slot limit, each created only if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    from flows.domlora_flow import GPU_SLOTS

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
        for q in queues:
            try:
                client.create_work_queue(q, work_pool_name=pool)
            except ObjectAlreadyExists:
                pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOTS, limit=gpu_slots))
        except ObjectAlreadyExists:
            pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Set up the Prefect server for a spread grid.")
    p.add_argument("--pool", default="domlora-pool", help="the process work pool prefect.yaml deploys to")
    p.add_argument("--queues", nargs="*", default=["grid", "gpu"], help="its work queues")
    p.add_argument("--gpu-slots", type=int, default=2, help="size of the domlora-gpu limit (one-host grids)")
    p.add_argument("--crash-after", type=float, default=300,
                   help="seconds without a heartbeat after which a flow run counts as crashed "
                        "(over 2x PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    a = p.parse_args(argv)
    ensure_pool(a.pool, a.queues, gpu_slots=a.gpu_slots)
    print(f"pool {a.pool} with queues {', '.join(a.queues)}; "
          f"automation {AUTOMATION!r}: {ensure_crash_automation(a.crash_after)}")


if __name__ == "__main__":
    main()

"""One-time set-up of a Prefect server for a grid spread over hosts (scripts/cluster.sh server runs it).

The automation is Prefect's documented answer to a host that dies mid-run ("zombie" flow runs):
flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds; a run that has sent
none for `--crash-after` seconds is marked Crashed, and the grid sends that unit again to any
GPU host's worker.

Run as: python -m flows.cluster_setup --crash-after 300
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Set up the Prefect server for a spread grid.")
    p.add_argument("--crash-after", type=float, default=300,
                   help="seconds without a heartbeat after which a flow run counts as crashed "
                        "(over 2x PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    a = p.parse_args(argv)
    print(f"automation {AUTOMATION!r}: {ensure_crash_automation(a.crash_after)}")


if __name__ == "__main__":
    main()

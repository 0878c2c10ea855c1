"""report stage: tables in the paper's layouts, PAGE heatmaps, loss curves, the dominant module summary, and
the placement comparison (reports/placement.md).

Run as: python -m stages.report
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.placement_report import write_placement_report
from domlora.pipeline.report import write_report
from domlora.pipeline.tracking import make_tracker


def main(argv: list[str] | None = None) -> int:
    a = stage_parser(__doc__).parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        layout = Layout(a.root)
        write_report(params, layout, tracker=make_tracker(params), registry=layout.root / "registry" / "dominant_modules.json")
        write_placement_report(params, layout)
    return run_main(go, name="stages.report")


if __name__ == "__main__":
    sys.exit(main())

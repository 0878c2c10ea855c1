"""sweep stage: train one method of a budget class at one candidate learning rate and score the validation split.

Run as: python -m stages.sweep --run smol-arith-dom-lr0
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.sweep import sweep_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--run", required=True, help="MODEL-DATASET-METHOD-lrN")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        sweep_stage(params, a.run, layout=Layout(a.root), show_progress=not a.no_progress)
    return run_main(go, name="stages.sweep")


if __name__ == "__main__":
    sys.exit(main())

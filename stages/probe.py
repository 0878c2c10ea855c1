"""probe stage: every step-0 signal of a model's modules on a dataset's probe split: PAGE, NFN and the
activation statistics (massive activations and their prediction of the dominant module).

Run as: python -m stages.probe --model smol --dataset arith
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.probe import probe_stage
from domlora.pipeline.tracking import make_tracker


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="model slug from params.yaml")
    p.add_argument("--dataset", required=True, help="dataset slug from params.yaml")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        probe_stage(params, a.model, a.dataset, layout=Layout(a.root), tracker=make_tracker(params),
                    show_progress=not a.no_progress)
    return run_main(go, name="stages.probe")


if __name__ == "__main__":
    sys.exit(main())

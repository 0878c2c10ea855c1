"""evaluate stage: lm-eval on a cell's adapter, or on the base model (`--base MODEL-DATASET`).

Run as: python -m stages.evaluate --cell smol-arith-domlora-0
        python -m stages.evaluate --base smol-arith
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.errors import ConfigError
from domlora.pipeline.grid import stage_params
from domlora.pipeline.params import Cell
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.evaluate import evaluate_stage
from domlora.pipeline.tracking import make_tracker


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cell", help="MODEL-DATASET-METHOD-SEED")
    g.add_argument("--base", help="MODEL-DATASET: evaluate the base model without an adapter")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        layout = Layout(a.root)
        if a.base:
            parts = a.base.split("-")
            if len(parts) != 2:
                raise ConfigError(f"--base must be MODEL-DATASET, got {a.base!r}")
            evaluate_stage(params, "base", model=parts[0], dataset=parts[1], layout=layout,
                           show_progress=not a.no_progress)
        else:
            evaluate_stage(params, Cell.parse(a.cell), layout=layout, tracker=make_tracker(params),
                           show_progress=not a.no_progress)
    return run_main(go, name="stages.evaluate")


if __name__ == "__main__":
    sys.exit(main())

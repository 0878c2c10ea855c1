"""tune stage: a budget class's learning rate from its sweep (lowest mean validation NLL over its methods).

Run as: python -m stages.tune --budget smol-arith-module
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.errors import ConfigError
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.tune import tune_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--budget", required=True, help="MODEL-DATASET-BUDGET")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        parts = a.budget.split("-")
        if len(parts) != 3:
            raise ConfigError(f"--budget must be MODEL-DATASET-BUDGET, got {a.budget!r}")
        tune_stage(params, *parts, layout=Layout(a.root))
    return run_main(go, name="stages.tune")


if __name__ == "__main__":
    sys.exit(main())

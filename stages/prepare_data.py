"""prepare_data stage: write data/<dataset>/{train,probe,eval}.jsonl and stats.json.

Run as: python -m stages.prepare_data --dataset arith
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.prepare_data import prepare_data_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--dataset", required=True, help="dataset slug from params.yaml")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        prepare_data_stage(params, a.dataset, layout=Layout(a.root), show_progress=not a.no_progress)
    return run_main(go, name="stages.prepare_data")


if __name__ == "__main__":
    sys.exit(main())

"""select stage: a method's placement (exact module names + evidence) from the probe.

Run as: python -m stages.select --model smol --dataset arith --method domlora
"""
from __future__ import annotations

import sys

from domlora.entry import run_main, stage_parser
from domlora.pipeline.grid import stage_params
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.select import select_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="model slug")
    p.add_argument("--dataset", required=True, help="dataset slug")
    p.add_argument("--method", required=True, help="method slug")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        select_stage(params, a.model, a.dataset, a.method, layout=Layout(a.root))
    return run_main(go, name="stages.select")


if __name__ == "__main__":
    sys.exit(main())

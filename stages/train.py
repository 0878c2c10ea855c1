"""train stage: train one grid cell's adapter, on the processes its recipe asks for.

Run as: python -m stages.train --cell smol-arith-domlora-0
"""
from __future__ import annotations

import subprocess
import sys

from domlora.entry import run_main, stage_parser
from domlora.errors import ConfigError
from domlora.pipeline.grid import stage_params
from domlora.pipeline.launch import launch_command
from domlora.pipeline.params import Cell
from domlora.pipeline.paths import Layout
from domlora.pipeline.stages.train import train_stage
from domlora.pipeline.tracking import make_tracker


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--cell", required=True, help="MODEL-DATASET-METHOD-SEED")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        cell = Cell.parse(a.cell)
        if cell not in params.cells(models=[cell.model], datasets=[cell.dataset], methods=[cell.method],
                                    seeds=[cell.seed]):
            raise ConfigError(f"cell {cell.id} is not in the grid: method {cell.method} runs only on "
                              f"{params.methods[cell.method].models}")
        cfg = params.train_config(cell.method, seed=cell.seed)
        # train.num_processes > 1: start them (accelerate launch on GPUs, torchrun on a CPU), each running this
        cmd = launch_command(cfg.num_processes, ["stages.train", *(sys.argv[1:] if argv is None else argv)],
                             device=cfg.device)
        if cmd is not None:
            return subprocess.run(cmd).returncode
        train_stage(params, cell, layout=Layout(a.root), tracker=make_tracker(params), show_progress=not a.no_progress)
    return run_main(go, name="stages.train")


if __name__ == "__main__":
    sys.exit(main())

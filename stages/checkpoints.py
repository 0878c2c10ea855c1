"""checkpoints stage (the paper's Figure 2): full fine-tuning checkpoints of a model, PAGE at each.

Run as: python -m stages.checkpoints --model qwen3_8b --dataset tulu
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from domlora.entry import run_main, stage_parser
from domlora.errors import DomloraError
from domlora.pipeline.grid import stage_params
from domlora.pipeline.launch import launch_command
from domlora.pipeline.paths import Layout
from domlora.studies.checkpoints import checkpoints_stage, finetune_checkpoints_stage


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="model slug")
    p.add_argument("--dataset", required=True, help="dataset slug")
    p.add_argument("--finetune-only", default=None, metavar="DIR",
                   help="(used by the launcher) only fine-tune, saving the step checkpoints into DIR")
    a = p.parse_args(argv)

    def go():
        params = stage_params(a.params, a.profile, a.root)
        layout = Layout(a.root)
        if a.finetune_only:
            finetune_checkpoints_stage(params, a.model, a.dataset, work=Path(a.finetune_only), layout=layout)
            return 0
        cfg = params.train_config_for_study(params.checkpoints)

        def launch(work: Path) -> None:
            args = ["stages.checkpoints", "--model", a.model, "--dataset", a.dataset, "--finetune-only", str(work),
                    "--params", a.params, "--root", a.root] + (["--profile", a.profile] if a.profile else [])
            cmd = launch_command(cfg.num_processes, args, device=cfg.device)
            if subprocess.run(cmd).returncode != 0:
                raise DomloraError(f"the fine-tuning processes of the checkpoint study failed: {' '.join(cmd)}")

        launching = launch_command(cfg.num_processes, ["stages.checkpoints"], device=cfg.device) is not None
        checkpoints_stage(params, a.model, a.dataset, layout=layout, launch=launch if launching else None,
                          show_progress=not a.no_progress)
    return run_main(go, name="stages.checkpoints")


if __name__ == "__main__":
    sys.exit(main())

"""The training launcher: a train stage runs on `train.num_processes` processes, whoever starts it.

dvc.yaml declares `python -m stages.train --cell ID` for every cell, and the Prefect flow runs that
same command; so the stage itself starts the processes the recipe asks for: on GPUs through
`accelerate launch --multi_gpu` (one process per GPU; DeepSpeed ZeRO-2 is then set up by the
training loop from `train.deepspeed`), on a CPU through `torchrun` (gloo; `accelerate launch --cpu`
starts only one process). The effective batch is batch_size x grad_accum x num_processes, the
paper's 4 x 8 x 8 = 256; the run's record says what it was.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys

from domlora.errors import ConfigError

logger = logging.getLogger(__name__)


def in_launched_process() -> bool:
    """True inside a process a launcher started (torchrun / accelerate set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_devices(num_processes: int, *, device: str | None = None) -> str:
    """The kind of processes to start ("gpu" or "cpu") for `num_processes`; a clear error when the machine
    cannot give them, before any work starts."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus > 0 and (device is None or device.startswith("cuda"))
    if on_gpu and num_processes > gpus:
        raise ConfigError(f"train.num_processes is {num_processes} but this machine has {gpus} GPU(s); fix: set "
                          f"num_processes: {gpus} (and multiply grad_accum by {num_processes / gpus:g} to keep the "
                          f"effective batch), or run on a machine with {num_processes} GPUs")
    cores = os.cpu_count() or 1
    if not on_gpu and num_processes > cores:
        raise ConfigError(f"train.num_processes is {num_processes} but this machine has no GPU and {cores} CPU "
                          f"core(s); fix: num_processes <= {cores} for CPU (gloo) processes, or run on GPUs")
    return "gpu" if on_gpu else "cpu"


def launch_command(num_processes: int, module_argv: list[str], *, device: str | None = None) -> list[str] | None:
    """The command that runs `python -m <module_argv>` on `num_processes` processes, or None to run it here
    (one process, or already inside a launched process)."""
    if num_processes <= 1 or in_launched_process():
        return None
    kind = check_devices(num_processes, device=device)
    bin_dir = os.path.dirname(sys.executable)
    if kind == "gpu":
        exe = shutil.which("accelerate", path=bin_dir) or shutil.which("accelerate")
        return [exe or "accelerate", "launch", "--multi_gpu", "--num_machines", "1",
                "--num_processes", str(num_processes), "-m", *module_argv]
    exe = shutil.which("torchrun", path=bin_dir) or shutil.which("torchrun")
    return [exe or "torchrun", "--standalone", "--nproc_per_node", str(num_processes), "-m", *module_argv]

"""Where a run trains: its device and precision, and the processes (Accelerate: single, DDP or DeepSpeed ZeRO-2)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from domlora.errors import ConfigError
from domlora.train.config import TrainConfig

logger = logging.getLogger(__name__)


def resolve_device(cfg: TrainConfig, dtype: str) -> str:
    import torch

    want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {want!r} asked for but no CUDA GPU is visible; fix: --device cpu "
                          "(or run on a GPU machine)")
    if want == "cpu" and dtype == "float16":
        raise ConfigError("float16 training needs a GPU (no fp16 kernels/loss scaling on CPU); "
                          "fix: the model's dtype float32 (or auto) on CPU")
    return want



def runs_bf16(model, device: str) -> bool:
    """Mixed precision follows the loaded weights: bfloat16 weights on a GPU train under bf16 autocast."""
    import torch

    return device.startswith("cuda") and next(model.parameters()).dtype == torch.bfloat16


def peak_memory(device: str) -> tuple[float, str]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def deepspeed_config(path: str, cfg: TrainConfig, world: int, bf16: bool) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist; fix: pass configs/deepspeed_zero2.json")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("train.deepspeed needs the `deepspeed` package; fix: pip install -c constraints.txt "
                          "deepspeed (it comes with the `pipeline` extra)") from None
    ds = json.loads(p.read_text())
    fill = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
            "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for key, on in (("bf16", bf16), ("fp16", False)):
        sec = ds.setdefault(key, {})
        if sec.get("enabled", "auto") == "auto":
            sec["enabled"] = on
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("the DeepSpeed config must not define `optimizer`/`scheduler`: the training loop builds "
                          "them (LoRA+ groups, the paper's schedule); fix: remove those sections")
    return ds


_CLOSE_AT_EXIT: list = []


def close_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if it is still up then (registered once).

    A gloo group left to the interpreter's teardown can abort its process ("terminate called without an active
    exception") after the work is done and saved, failing the launcher's run; destroyed at exit, after the last
    barrier, it shuts its threads down first. At exit, so that a process may still train again after `train`.
    """
    if _CLOSE_AT_EXIT:
        return
    import atexit

    def close():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # exiting anyway: say so, do not mask the exit status
                logger.warning("could not destroy the process group at exit: %s", e)

    atexit.register(close)
    _CLOSE_AT_EXIT.append(close)


def make_accelerator(cfg: TrainConfig, device: str, *, bf16: bool):
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.grad_accum, "cpu": device == "cpu"}
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = deepspeed_config(cfg.deepspeed, cfg, world, bf16)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
        kwargs["mixed_precision"] = "bf16" if bf16 else "no"
    elif bf16:
        kwargs["mixed_precision"] = "bf16"
    if cfg.layer_sampling != "none" and not cfg.deepspeed:
        from accelerate.utils import DistributedDataParallelKwargs

        # IST/RST train a subset of the adapters each step: DDP must not wait for the others' gradients
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(**kwargs)



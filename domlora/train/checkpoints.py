"""Periodic checkpoints of a training run, from which a killed run resumes (same config -> same adapter)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from domlora.adapters.variants import adapter_state
from domlora.errors import ConfigError
from domlora.io import atomic_dir, read_json, write_json
from domlora.train.config import CHECKPOINTS, TrainConfig, _NON_SEMANTIC


def fingerprint(*, model_id: str, data_digest: str, modules: list[str], cfg: TrainConfig,
                study: dict | None = None) -> str:
    conf = {k: v for k, v in asdict(cfg).items() if k not in _NON_SEMANTIC}
    doc = {"model": model_id, "data": data_digest, "modules": sorted(modules), "cfg": conf, "study": study or None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]



def list_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "info.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _adalora_state(unwrapped) -> dict | None:
    alloc = getattr(getattr(unwrapped, "base_model", None), "rankallocator", None)
    if alloc is None:
        return None
    cfg = unwrapped.peft_config["default"]
    return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
            "rank_pattern": cfg.rank_pattern}


def save_checkpoint(out_dir: Path, step: int, *, accelerator, net, optimizer, scheduler, ist, history: dict,
                     fp: str, keep: int, use_ds: bool, names: list[str]) -> Path:
    import torch

    unwrapped = accelerator.unwrap_model(net)
    target = out_dir / CHECKPOINTS / f"step-{step:07d}"
    if use_ds:  # collective: every rank writes its shard
        tmp = target.parent / f".{target.name}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        # every rank writes its own files into it (its RNG state): the folder exists before any rank writes
        (tmp / "ds").mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "ds"), exclude_frozen_parameters=True)
        # every rank writes its RNG state after the collective part: all must be done before the folder moves
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(target) as d:
            if use_ds:
                os.replace(tmp / "ds", d / "ds")
                shutil.rmtree(tmp, ignore_errors=True)
            state = {"adapter": adapter_state(unwrapped, names), "scheduler": scheduler.state_dict(),
                     "ist": ist.state_dict() if ist else None, "adalora": _adalora_state(unwrapped),
                     "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            if not use_ds:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, d / "state.pt")
            write_json(d / "info.json", {"step": step, "fingerprint": fp, "history": history})
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(ck: Path, *, accelerator, net, optimizer, scheduler, ist, use_ds: bool) -> dict:
    import torch

    unwrapped = accelerator.unwrap_model(net)
    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for n, t in state["adapter"].items():
            if n not in params:
                raise ConfigError(f"checkpoint {ck} holds {n}, which this model lacks; fix: delete {ck.parent}")
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if use_ds:
        accelerator.load_state(str(ck / "ds"), load_module_strict=False)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ist is not None and state.get("ist"):
        ist.load_state_dict(state["ist"])
    if state.get("adalora"):
        alloc = unwrapped.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (state["adalora"][k] for k in ("ipt", "exp_avg_ipt",
                                                                                          "exp_avg_unc"))
        unwrapped.peft_config["default"].rank_pattern = state["adalora"]["rank_pattern"]
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return read_json(ck / "info.json")



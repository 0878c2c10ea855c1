"""Adapters at any placement: PEFT configs per LoRA variant, attachment verified against the placement.

    model = attach(model, ["model.layers.6.mlp.down_proj"], variant="lora", rank=64, alpha=128)
    save_adapter(model, "runs/x/adapter", variant="lora", meta={...})
    loaded = load_for_eval("embedded", "runs/x/adapter")     # base + adapter, ready to generate

Variants: LoRA, DoRA, LoRA+ (a LoRA adapter trained with PEFT's LoRA+ optimizer), AdaLoRA,
rsLoRA, GraLoRA, NoRM (a LoRA adapter reduced after training, see `domlora.adapters.norm`) and `full`
(full-parameter training of only the placed modules, no PEFT). Every adapter folder holds a
`domlora_adapter.json` next to what PEFT writes, naming the variant and the base model.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domlora.adapters import VARIANTS
from domlora.adapters.eva import bounded_eva_forward, check_eva, eva_batches, quiet_eva
from domlora.adapters.norm import params_after, reduce_model, save_reduced
from domlora.errors import ConfigError, ModelError
from domlora.io import atomic_dir, read_json, write_json
from domlora.locations import resolve_config
from domlora.models import config_hash, load_model, model_from_config
from domlora.modules import base_name, find_candidates
from domlora.placement import PlacementSpec, select

logger = logging.getLogger(__name__)

# variants that are plain LoRA layers while training (they differ in the optimizer or after training)
LORA_LIKE = ("lora", "lora_plus", "rslora", "norm", "dora")
META_FILE = "domlora_adapter.json"
FULL_WEIGHTS = "full_weights.safetensors"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def default_gralora_k(rank: int) -> int:
    """PEFT's advice: k=2 for rank <= 32, k=4 above."""
    return 4 if rank >= 64 else 2


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _projection_shapes(model, names: Sequence[str]) -> dict[str, tuple[int, int, bool]]:
    """name -> (d_in, d_out, conv1d) for every placed module; clear errors for missing or non-linear ones."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    base = _base(model)
    modules = dict(base.named_modules())
    out: dict[str, tuple[int, int, bool]] = {}
    missing = [n for n in names if n not in modules]
    if missing:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D))]
        hint = _close_names(missing[0], linear)
        raise ModelError(
            f"the placement names {len(missing)} module(s) this model does not have, e.g. {missing[0]!r}"
            f"{hint}; fix: select the placement on this model (domlora select with its probe), "
            f"or name modules as `{linear[0] if linear else 'model.layers.0.mlp.down_proj'}`")
    for n in names:
        m = modules[n]
        if hasattr(m, "get_base_layer"):  # already wrapped by PEFT
            m = m.get_base_layer()
        if isinstance(m, nn.Linear):
            out[n] = (m.in_features, m.out_features, False)
        elif Conv1D and isinstance(m, Conv1D):
            out[n] = (int(m.weight.shape[0]), int(m.weight.shape[1]), True)
        else:
            raise ModelError(f"placed module {n!r} is a {type(m).__name__}, not a linear projection; "
                             "fix: place adapters on projections such as `...mlp.down_proj`")
    return out


def _close_names(name: str, pool: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    return f" (closest: {', '.join(close)})" if close else ""


def check_compatible(model, placement_modules: Sequence[str], *, variant: str, rank: int,
                     gralora_k: int | None = None, total_step: int | None = None) -> dict[str, tuple[int, int, bool]]:
    """Explain an impossible variant/placement pair before PEFT fails deep inside.

    Returns the (d_in, d_out, conv1d) of each placed module.
    """
    check_variant(variant)
    if not placement_modules:
        raise ConfigError("the placement is empty; fix: pass at least one module name")
    if len(set(placement_modules)) != len(placement_modules):
        dup = sorted({n for n in placement_modules if list(placement_modules).count(n) > 1})
        raise ConfigError(f"the placement names modules twice: {dup[:3]}; fix: list each module once")
    shapes = _projection_shapes(model, placement_modules)
    if variant == "full":
        return shapes
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if variant == "gralora":
        k = gralora_k or default_gralora_k(rank)
        if rank % k:
            raise ConfigError(f"GraLoRA splits rank {rank} into k={k} blocks, so rank must be divisible by k; "
                              f"fix: --rank {rank - rank % k or k} or gralora_k dividing {rank}")
        bad = [(n, d_in, d_out) for n, (d_in, d_out, _) in shapes.items() if d_in % k or d_out % k]
        if bad:
            n, d_in, d_out = bad[0]
            raise ConfigError(f"GraLoRA with k={k} needs in/out features divisible by k, but {n} is "
                              f"{d_in} -> {d_out}; fix: choose gralora_k dividing both, or another variant")
    if variant == "adalora":
        if total_step is None or total_step < 1:
            raise ConfigError("AdaLoRA schedules its rank budget over the run, so it needs the total number of "
                              "optimizer steps; fix: pass total_step (train() does this for you)")
    if variant == "dora":
        conv = [n for n, (_, _, c) in shapes.items() if c]
        if conv:
            raise ConfigError(f"DoRA is not supported on GPT-2 style Conv1D modules ({conv[0]}); "
                              "fix: use variant lora / rslora on this architecture")
    small = [(n, min(d_in, d_out)) for n, (d_in, d_out, _) in shapes.items() if rank > min(d_in, d_out)]
    if small:
        logger.warning("rank %d exceeds min(d_in, d_out)=%d of %s: the update cannot use that rank",
                       rank, small[0][1], small[0][0])
    return shapes


def to_peft_config(placement_modules: list[str], *, variant: str, rank: int, alpha: float, dropout: float = 0.0,
                   fan_in_fan_out: bool = False, total_step: int | None = None, adalora_target_r: int | None = None,
                   adalora_tinit: int = 0, adalora_tfinal: int = 0, adalora_delta_t: int = 1,
                   adalora_beta1: float = 0.85, adalora_beta2: float = 0.85, adalora_orth_reg: float = 0.1,
                   gralora_k: int | None = None, gralora_hybrid_r: int = 0, **kw: Any):
    """A PEFT config targeting exactly `placement_modules`; None for `full` (no PEFT there).

    Extra keyword arguments go to the PEFT config class.
    """
    check_variant(variant)
    targets = list(placement_modules)
    if variant == "full":
        return None
    if dropout < 0 or dropout >= 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if variant in LORA_LIKE:
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                          task_type="CAUSAL_LM", use_dora=variant == "dora", use_rslora=variant == "rslora",
                          fan_in_fan_out=fan_in_fan_out, **kw)
    if variant == "adalora":
        from peft import AdaLoraConfig

        target_r = adalora_target_r if adalora_target_r is not None else max(1, (2 * rank) // 3)
        if not 1 <= target_r <= rank:
            raise ConfigError(f"adalora_target_r must be in [1, rank={rank}], got {target_r}")
        if total_step is None or total_step < 1:
            raise ConfigError("AdaLoRA needs total_step (the number of optimizer steps); fix: pass total_step")
        if adalora_tinit >= total_step - adalora_tfinal:
            raise ConfigError(f"AdaLoRA has no budgeting phase: tinit={adalora_tinit} >= total_step={total_step} - "
                              f"tfinal={adalora_tfinal}; fix: more steps or smaller adalora tinit/tfinal")
        return AdaLoraConfig(init_r=rank, target_r=target_r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=targets, bias="none", task_type="CAUSAL_LM", total_step=total_step,
                             tinit=adalora_tinit, tfinal=adalora_tfinal, deltaT=adalora_delta_t,
                             beta1=adalora_beta1, beta2=adalora_beta2, orth_reg_weight=adalora_orth_reg,
                             fan_in_fan_out=fan_in_fan_out, **kw)
    if variant == "gralora":
        from peft import GraloraConfig

        return GraloraConfig(r=rank, alpha=alpha, gralora_dropout=dropout, target_modules=targets,
                             gralora_k=gralora_k or default_gralora_k(rank), hybrid_r=gralora_hybrid_r,
                             bias="none", task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, **kw)
    raise AssertionError(variant)  # pragma: no cover


def adapted_modules(model) -> list[str]:
    """Names (relative to the base model) of the modules carrying an adapter or trainable full weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    if hasattr(model, "get_base_model"):
        for name, mod in model.named_modules():
            if isinstance(mod, BaseTunerLayer):
                found.append(base_name(name))
        return found
    for name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            found.append(name)
    return found


def attach(model, placement_modules: Sequence[str], *, variant: str, rank: int, alpha: float,
           dropout: float = 0.0, **kw: Any):
    """Put adapters on exactly `placement_modules`, freeze everything else, and verify it.

    Args:
        model: a `transformers` causal LM (frozen or not; every base weight is frozen here).
        placement_modules: fully-qualified module names, e.g. `model.layers.6.mlp.down_proj`.
        variant: one of `VARIANTS`; `full` makes the placed modules' own weights trainable.
        rank, alpha, dropout: the LoRA shape; keyword arguments `to_peft_config` accepts pass through.

    Returns:
        The `PeftModel` (or, for `full`, the model itself with only the placed weights trainable).

    Raises:
        ModelError / ConfigError: unknown module names, an impossible variant/placement pair, or a
            wrapped set that differs from the placement.
    """
    names = list(placement_modules)
    shapes = check_compatible(model, names, variant=variant, rank=rank, gralora_k=kw.get("gralora_k"),
                              total_step=kw.get("total_step"))
    model.requires_grad_(False)
    if variant == "full":
        mods = dict(model.named_modules())
        for n in names:
            for p in mods[n].parameters(recurse=False):
                p.requires_grad_(True)
        wrapped = adapted_modules(model)
    else:
        from peft import get_peft_model

        conv = any(c for _, _, c in shapes.values())
        cfg = to_peft_config(names, variant=variant, rank=rank, alpha=alpha, dropout=dropout,
                             fan_in_fan_out=conv, **kw)
        model = get_peft_model(model, cfg)
        # PEFT hooks the input embeddings to require grad when checkpointing is on; that would push
        # backward through every frozen layer below the adapter, so drop the hook
        disable_input_grads(model)
        wrapped = adapted_modules(model)
    if set(wrapped) != set(names):
        extra, lost = sorted(set(wrapped) - set(names)), sorted(set(names) - set(wrapped))
        raise ModelError(f"adapter attachment does not match the placement: wrapped but not placed {extra[:5]}, "
                         f"placed but not wrapped {lost[:5]}; fix: pass exact module names from this model")
    counts = count_params(model)
    logger.info("attached %s to %d module(s): %s trainable of %s parameters", variant, counts["modules"],
                f"{counts['trainable_params']:,}", f"{counts['total_params']:,}")
    return model


def init_eva(model, encoded, *, batch_size: int, pad_id: int, show_progress: bool = False) -> dict:
    """EVA: initialise an attached LoRA adapter (`init_lora_weights="eva"`) from training samples.

    Runs PEFT's `initialize_lora_eva_weights` on `encoded` (batches of `batch_size` in order, the SVD on
    assistant tokens only): each A becomes the top right-singular vectors of its module's inputs and
    LoRA's rank budget (rank x modules) is redistributed by explained variance; a module whose share
    is 0 loses its adapter. Call it after `attach` and before the optimizer is built.

    Returns:
        {"method": "eva", "ranks": {module: rank}, "zero_rank": [...], "seconds": float}
    """
    import time
    import warnings

    from peft import initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer

    cfg = model.peft_config["default"]
    if cfg.init_lora_weights != "eva":
        raise ConfigError("EVA initialisation needs an adapter attached with init_lora_weights='eva'; fix: train "
                          "with lora_init: eva")
    placed = adapted_modules(model)
    batches = eva_batches(list(encoded), batch_size=batch_size, pad_id=pad_id, device=next(model.parameters()).device)
    check_eva(batches, rank=cfg.r, rho=cfg.eva_config.rho,
              min_d_in=min(_projection_shapes(model, placed)[n][0] for n in placed))
    t0 = time.perf_counter()
    with quiet_eva(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(model, dataloader=batches, gather_distributed_inputs=False,
                                    forward_fn=bounded_eva_forward(len(batches), tau=cfg.eva_config.tau),
                                    show_progress_bar=show_progress)
    ranks = {n: 0 for n in placed}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.r:
            ranks[base_name(name)] = int(mod.r["default"])
    seconds = time.perf_counter() - t0
    logger.info("EVA initialised %d of %d modules in %.1f s", sum(r > 0 for r in ranks.values()), len(ranks), seconds)
    return {"method": "eva", "ranks": ranks, "zero_rank": [n for n, r in ranks.items() if r == 0],
            "seconds": round(seconds, 3)}


def disable_input_grads(model) -> None:
    """Remove the input-embedding "require grad" hooks transformers and PEFT add, anywhere in `model`.

    note: each `enable_input_require_grads` call overwrites the handle list of the previous one
    (activation checkpointing and PEFT both call it), so look the hooks up on the modules.
    """
    names = {"make_inputs_require_grads", "make_inputs_require_grad"}
    for mod in model.modules():
        if hasattr(mod, "disable_input_require_grads") and getattr(mod, "_require_grads_hooks", None):
            mod.disable_input_require_grads()
        hooks = getattr(mod, "_forward_hooks", None)
        if hooks:
            for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in names]:
                del hooks[key]


def count_params(model) -> dict:
    """{"trainable_params", "total_params", "modules"}; works on the meta device (counts only shapes)."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable_params": int(trainable), "total_params": int(total), "modules": len(adapted_modules(model))}


def adapter_state(model, names: Sequence[str] | None = None) -> dict:
    """The trained tensors (`names`, default: those requiring grad now) plus AdaLoRA's rank counters."""
    keep = set(names) if names is not None else {n for n, p in model.named_parameters() if p.requires_grad}
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in keep}
    # AdaLoRA keeps its (non-trainable) rank counter as a parameter; keep it with the state
    for n, p in model.named_parameters():
        if "ranknum" in n:
            state[n] = p.detach().cpu().clone()
    return state


def save_adapter(model, out_dir: str | os.PathLike, *, variant: str, meta: dict | None = None,
                 norm_step: float = 0.1, norm_range_start: int = 1) -> dict:
    """Write an adapter folder atomically; PEFT variants load with `PeftModel.from_pretrained`.

    `full` writes the placed modules' weights (`full_weights.safetensors`) instead. `norm`
    reduces every LoRA pair with Sim-Search first (`domlora.adapters.norm.reduce_model`) and writes
    the reduced LoRA (per-module ranks and alphas in `rank_pattern` / `alpha_pattern`, scaling 1);
    its metadata gains `norm` (per module: trained and kept rank, parameters, scale, similarities)
    and `params_after_norm`. Returns the metadata written.
    """
    check_variant(variant)
    from safetensors.torch import save_file

    meta = dict(meta or {})
    base = _base(model)
    doc = {"format": 1, "variant": variant, "modules": sorted(adapted_modules(model)),
           "base_config_hash": config_hash(base),
           "base_model": meta.pop("base_model", getattr(base.config, "_name_or_path", None))} | meta
    if doc["base_model"] and hasattr(model, "peft_config"):
        # PEFT writes base_model_name_or_path from the config; name the base a PEFT user can load anywhere
        for c in model.peft_config.values():
            c.base_model_name_or_path = doc["base_model"]
    with atomic_dir(out_dir) as tmp:
        if variant == "full":
            mods = dict(base.named_modules())
            tensors, seen, tied = {}, {}, {}
            for n in doc["modules"]:
                for pname, p in mods[n].named_parameters(recurse=False):
                    key = f"{n}.{pname}"
                    if id(p) in seen:  # tied weights (embeddings / LM head): store once
                        tied[key] = seen[id(p)]
                        continue
                    seen[id(p)] = key
                    tensors[key] = p.detach().cpu().contiguous()
            save_file(tensors, str(tmp / FULL_WEIGHTS))
            doc["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
            doc["tied"] = tied
        elif variant == "norm":
            reduced = reduce_model(model, step=norm_step, range_start=norm_range_start)
            save_reduced(model, reduced, tmp)
            doc["norm"] = {n: r.summary() for n, r in reduced.items()}
            doc["params_after_norm"] = params_after(reduced)
        else:
            model.save_pretrained(str(tmp))
        write_json(tmp / META_FILE, doc)
    return doc


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """The `domlora_adapter.json` of a folder (a plain PEFT folder gets variant `peft`)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelError(f"adapter folder {d} does not exist; fix: pass the `adapter/` folder a training run wrote")
    meta_path = d / META_FILE
    if meta_path.is_file():
        try:
            return read_json(meta_path)
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"adapter folder {d} is corrupt: {META_FILE} is unreadable ({exc}); "
                             "fix: retrain, or restore the folder") from None
    if (d / "adapter_config.json").is_file():
        return {"variant": "peft"}
    raise ModelError(f"{d} is not an adapter folder (no {META_FILE} and no adapter_config.json); "
                     "fix: pass the `adapter/` folder a training run wrote")


def _check_shapes(model, tensors: dict[str, tuple], adapter_dir, meta: dict) -> None:
    """Compare saved adapter tensor shapes with the base model's modules; explain a mismatch."""
    base = _base(model)
    mods = dict(base.named_modules())
    trained_on = meta.get("base_model") or "unknown"
    for key, shape in tensors.items():
        name = base_name(key)
        parts = name.split(".")
        # find the adapted module: the longest prefix that names a module of the base model
        for cut in range(len(parts) - 1, 0, -1):
            mod_name = ".".join(parts[:cut])
            if mod_name in mods:
                break
        else:
            raise ModelError(f"adapter {adapter_dir} names {key!r}, which this base model does not have: it was "
                             f"trained for another base model ({trained_on}); fix: load it on that model")
        mod = mods[mod_name]
        w = getattr(mod, "weight", None)
        if w is None:  # only a container (`model.layers`) matched: the adapted module is missing
            raise ModelError(f"adapter {adapter_dir} names {key!r}, which this base model does not have: it was "
                             f"trained for another base model ({trained_on}); fix: load it on that model")
        leaf = parts[cut] if cut < len(parts) else ""
        if leaf in ("weight", "bias") and cut == len(parts) - 1:
            have = tuple(getattr(mod, leaf).shape)
            ok = tuple(shape) == have
        else:
            d_out, d_in = (w.shape[1], w.shape[0]) if type(mod).__name__ == "Conv1D" else (w.shape[0], w.shape[-1])
            have = f"{d_in} -> {d_out}"
            ok = not ((leaf == "lora_A" and len(shape) == 2 and shape[1] != d_in)
                      or (leaf == "lora_B" and len(shape) == 2 and shape[0] != d_out))
        if not ok:
            raise ModelError(f"adapter {adapter_dir} does not fit this base model: {key} has shape {list(shape)} "
                             f"but {mod_name} is {have}; it was trained for another base model "
                             f"({trained_on}); fix: load it on that model")


def _tensor_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"adapter weights {path} are corrupt or truncated ({str(exc).splitlines()[0]}); "
                         "fix: retrain, or restore the folder") from None


def apply_adapter(model, adapter_dir: str | os.PathLike, *, merge: bool = False):
    """Apply a saved adapter of any variant to `model` (modified in place for `full`); returns the model."""
    d = Path(adapter_dir)
    meta = read_adapter_meta(d)
    variant = meta.get("variant")
    if variant == "full":
        from safetensors.torch import load_file

        wfile = d / FULL_WEIGHTS
        if not wfile.is_file():
            raise ModelError(f"adapter folder {d} is incomplete: {FULL_WEIGHTS} is missing; fix: retrain")
        _check_shapes(model, _tensor_shapes(wfile), d, meta)
        tensors = load_file(str(wfile))
        params = dict(_base(model).named_parameters(remove_duplicate=False))  # tied weights under both names
        import torch

        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k].dtype))
        return model
    wfile = d / "adapter_model.safetensors"
    if not (d / "adapter_config.json").is_file() or not wfile.is_file():
        raise ModelError(f"adapter folder {d} is incomplete: expected adapter_config.json and "
                         "adapter_model.safetensors; fix: retrain, or restore the folder")
    try:
        json.loads((d / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"adapter folder {d} is corrupt: adapter_config.json is not JSON ({exc.msg}); "
                         "fix: retrain, or restore the folder") from None
    _check_shapes(model, _tensor_shapes(wfile), d, meta)
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(d), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ModelError(f"cannot apply adapter {d}: {str(exc).splitlines()[0]}; fix: check that it was "
                         f"trained for this base model ({meta.get('base_model') or 'unknown'})") from None
    if merge:
        model = model.merge_and_unload()
    return model


def load_for_eval(model, adapter_dir: str | os.PathLike | None, *, device: str | None = None,
                  cache_dir: str | os.PathLike | None = None, merge: bool = False):
    """Load a base model and apply a trained adapter of any variant, ready for generation.

    The one loader of a base model + adapter (evaluation, GRPO warm starts, the checkpoint study).

    Args:
        model: a `ModelSpec` (id, dtype, trust_remote_code) or its id: `embedded`, a hub id or a folder.
        adapter_dir: a folder written by `save_adapter` / training (`runs/<cell>/adapter`), or None
            for the base model alone.
        merge: fold LoRA-type updates into the base weights (the same function, faster generation);
            a variant that cannot merge stays unmerged.

    Returns:
        `models.LoadedModel` whose `.model` carries the adapter (eval mode, frozen).

    Raises:
        ModelError: a missing, incomplete or corrupt adapter folder, or one trained for another base
            model (tensor shapes do not fit).
    """
    if adapter_dir is not None:
        meta = read_adapter_meta(adapter_dir)  # fail before loading a large model
    loaded = load_model(model, device=device, cache_dir=cache_dir)
    if adapter_dir is None:
        return loaded
    want = meta.get("base_config_hash")
    if want and want != config_hash(loaded.model):
        logger.warning("adapter %s was trained on a model with another config (%s); shapes are checked next",
                       adapter_dir, meta.get("base_model"))
    m = apply_adapter(loaded.model, adapter_dir)
    if merge and hasattr(m, "merge_and_unload") and hasattr(m, "peft_config"):
        try:
            m = m.merge_and_unload()
            logger.info("merged the adapter into the base weights")
        except Exception as exc:  # some variants cannot merge; use them unmerged
            logger.info("using the adapter unmerged (%s)", str(exc).splitlines()[0][:120])
    m.eval()
    m.requires_grad_(False)
    loaded.model = m
    return loaded


# ---------------------------------------------------------------------------------------------
# parameter counts without weights

def count_placement(config: str | os.PathLike, *, strategy: str, layers: Sequence[int] = (),
                    types: Sequence[str] = (), rank: int = 64, alpha: float | None = None,
                    variant: str = "lora") -> dict:
    """Build the model on the meta device, attach the adapter and count parameters.

    Returns:
        {"trainable_params", "total_params", "modules"} (total includes the adapter).
    """
    check_variant(variant)
    model = model_from_config(resolve_config(config), device="meta")
    cands = find_candidates(model)
    table = {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out} for c in cands}
    placement = select(PlacementSpec(strategy=strategy, types=tuple(types), layers=tuple(layers)), modules=table)
    kw = {"total_step": 1000} if variant == "adalora" else {}
    model = attach(model, placement.modules, variant=variant, rank=rank,
                   alpha=alpha if alpha is not None else 2.0 * rank, **kw)
    return count_params(model)

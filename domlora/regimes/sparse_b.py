"""Budgeted placement inside B: LoRA with A frozen and only k chosen entries of B trainable.

The study of seed 003 ("not how many, but which"): given a budget of k trainable entries
in the B matrices of a LoRA adapter, does it matter which k? Three ways to choose them:

- ``random``: a seeded uniform sample;
- ``informed``: entries whose gradient keeps its sign over a few probe steps
  (score ``|mean_s sign(g_s)|``, ties broken by ``|mean_s g_s|``);
- ``magnitude``: plain gradient magnitude ``mean_s |g_s|``, for comparison.

The probe steps are S gradient evaluations on S different batches at the initial adapter
(no update in between), so scoring costs S forward/backward passes and changes nothing.

A mask is a boolean tensor per adapted module, shaped like its B. Gradient hooks multiply
B's gradient by the mask, so unselected entries get an exact zero gradient; AdamW's moments
for them stay zero and the entries never move (B starts at 0 and decoupled weight decay only
scales it, so a trained sparse adapter is exactly zero outside its mask). Masks are saved beside the
PEFT adapter (``sparse_b_masks.safetensors`` + ``sparse_b.json``) and re-installed on load.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domlora.adapters.variants import attach
from domlora.errors import ConfigError, DataError, ModelError
from domlora.io import read_json, write_json
from domlora.models import LoadedModel, load_model
from domlora.modules import base_name, find_candidates
from domlora.placement import Placement
from domlora.regimes.arith import arith_accuracy, read_prompts
from domlora.regimes.settings import BUDGETS, SparseBSpec
from domlora.samples import collate, encode_samples, per_sample_loss, read_samples
from domlora.train.loop import train

logger = logging.getLogger(__name__)

MASKS_FILE = "sparse_b_masks.safetensors"
META_FILE = "sparse_b.json"
# residual-stream-writing projections, where the paper finds the chosen entries
PAPER_WRITERS = ("v_proj", "o_proj", "down_proj")

# ---------------------------------------------------------------- the adapter's B and A


def lora_layers(peft_model, *, adapter: str = "default") -> dict[str, Any]:
    """Base-model module name -> PEFT LoRA layer, for every module carrying `adapter`."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_B", {}):
            out[base_name(name)] = mod
    if not out:
        raise ModelError(f"the model carries no LoRA adapter named {adapter!r}; fix: attach a LoRA adapter "
                         "(domlora.adapters.variants.attach or peft.get_peft_model) before making B sparse")
    return dict(sorted(out.items()))


def lora_b_params(peft_model, *, adapter: str = "default") -> dict[str, Any]:
    """Base-model module name -> its B weight (d_out x r)."""
    return {n: m.lora_B[adapter].weight for n, m in lora_layers(peft_model, adapter=adapter).items()}


def b_sizes(peft_model, *, adapter: str = "default") -> dict[str, int]:
    return {n: p.numel() for n, p in lora_b_params(peft_model, adapter=adapter).items()}


def freeze_a(peft_model, *, adapter: str = "default") -> int:
    """Freeze every LoRA A (and any other non-B adapter weight); return the number frozen."""
    n = 0
    for mod in lora_layers(peft_model, adapter=adapter).values():
        for p in mod.lora_A[adapter].parameters():
            p.requires_grad_(False)
            n += p.numel()
        for p in mod.lora_B[adapter].parameters():
            p.requires_grad_(True)
    return n


# ---------------------------------------------------------------- budget


def allocate(k: int, sizes: Mapping[str, int], budget: str) -> dict[str, int] | None:
    """Check k against B's size; for `per_module`, split k over modules in proportion to their size.

    Returns None for the global budget (the scores decide where entries go).

    Raises:
        ConfigError: k <= 0, k larger than all of B, or a split that leaves a module with nothing.
    """
    total = sum(sizes.values())
    if not sizes or total == 0:
        raise ConfigError("no B entries to choose from (no adapted modules); fix: check the placement")
    if k <= 0:
        raise ConfigError(f"k must be >= 1, got {k}")
    if k > total:
        raise ConfigError(f"k={k} is larger than B's size: the {len(sizes)} adapted module(s) hold {total} "
                          f"B entries in all; fix: k <= {total} (k = {total} trains all of B)")
    if budget == "global":
        return None
    if budget != "per_module":
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    # same density in every module: floor of the proportional share, then the largest remainders
    exact = {n: k * s / total for n, s in sizes.items()}
    alloc = {n: int(math.floor(v)) for n, v in exact.items()}
    left = k - sum(alloc.values())
    for n in sorted(exact, key=lambda n: (-(exact[n] - alloc[n]), n))[:left]:
        alloc[n] += 1
    empty = [n for n, a in alloc.items() if a == 0]
    if empty:
        need = math.ceil(total / min(sizes.values()))
        raise ConfigError(
            f"a per-module budget of k={k} (split in proportion to B's size) leaves {len(empty)} module(s) with "
            f"no trainable entry, e.g. {empty[0]}; fix: k >= {need} so every module gets one, or budget='global'")
    return alloc


# ---------------------------------------------------------------- scoring


@dataclass
class EntryScores:
    """Gradient statistics of every B entry over S probe steps."""

    sign_agreement: dict[str, Any]
    """|mean_s sign(g_s)| in [0, 1] (1: the same sign at every step)"""
    mean_grad: dict[str, Any]
    """mean_s g_s"""
    mean_abs: dict[str, Any]
    """mean_s |g_s|"""
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def score_entries(peft_model, loss_fn: Callable[[int], Any], *, steps: int, adapter: str = "default",
                  show_progress: bool = False) -> EntryScores:
    """Evaluate B's gradient at S probe steps and reduce it to per-entry statistics.

    Only B gets a gradient during scoring (everything else is frozen for the duration and
    restored after); no parameter changes and no `.grad` is left behind.

    Args:
        peft_model: the model with its LoRA adapter attached.
        loss_fn: ``loss_fn(step) -> scalar loss tensor`` for probe step ``step`` (0..S-1);
            each step should use a different batch.
        steps: S.
    """
    import torch

    if steps < 1:
        raise ConfigError(f"probe steps must be >= 1, got {steps}")
    bs = lora_b_params(peft_model, adapter=adapter)
    saved = {id(p): p.requires_grad for p in peft_model.parameters()}
    saved_grads = {id(p): p.grad for p in bs.values()}
    t0 = time.perf_counter()
    sign_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in bs.items()}
    g_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in bs.items()}
    abs_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in bs.items()}
    losses: list[float] = []
    was_training = peft_model.training
    try:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for p in bs.values():
            p.requires_grad_(True)
            p.grad = None
        it: Iterable[int] = range(steps)
        if show_progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="score B entries")
        for s in it:
            loss = loss_fn(s)
            if not torch.isfinite(loss):
                raise DataError(f"probe step {s} gave a non-finite loss ({float(loss)}); fix: check the data "
                                "and the model dtype (float32 on CPU)")
            grads = torch.autograd.grad(loss, list(bs.values()), allow_unused=True)
            losses.append(float(loss.detach()))
            for (n, p), g in zip(bs.items(), grads, strict=True):
                if g is None:
                    continue
                g = g.detach().float()
                sign_sum[n] += torch.sign(g)
                g_sum[n] += g
                abs_sum[n] += g.abs()
    finally:
        for p in peft_model.parameters():
            p.requires_grad_(saved[id(p)])
        for p in bs.values():
            p.grad = saved_grads[id(p)]
        peft_model.train(was_training)
    seconds = time.perf_counter() - t0
    return EntryScores(sign_agreement={n: (v / steps).abs() for n, v in sign_sum.items()},
                       mean_grad={n: v / steps for n, v in g_sum.items()},
                       mean_abs={n: v / steps for n, v in abs_sum.items()}, steps=steps, seconds=seconds,
                       losses=losses)


def sft_probe_loss(peft_model, encoded, *, pad_id: int, batch_size: int, seed: int) -> Callable[[int], Any]:
    """`loss_fn(step)` for scoring on supervised samples: step s uses its own seeded batch."""
    import random

    if not encoded:
        raise DataError("no probe samples to score B entries on; fix: pass training data with assistant turns")
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    device = next(peft_model.parameters()).device

    def loss_fn(step: int):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        batch = collate([encoded[i] for i in idx], pad_id=pad_id, device=device)
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_sample_loss(logits, batch).mean()

    return loss_fn


# ---------------------------------------------------------------- selection


def _sort_keys(scores: EntryScores | None, selection: str, name: str):
    """Primary and secondary keys (higher is better) of one module's entries."""
    if selection == "informed":
        return scores.sign_agreement[name].flatten(), scores.mean_grad[name].abs().flatten()
    if selection == "magnitude":
        return scores.mean_abs[name].flatten(), None
    raise ConfigError(f"selection {selection!r} has no gradient score")


def _top(primary, secondary, k: int, gen):
    """Indices of the k best entries: by primary, ties by secondary (both descending), then at random.

    The seeded random order under the two keys matters when scores tie wholesale (e.g. a probe with
    no signal gives all-zero scores): the choice then falls back to a random one instead of the
    first entries in module order.
    """
    import torch

    order = torch.randperm(primary.numel(), generator=gen)
    if secondary is not None:
        order = order[torch.sort(secondary[order], descending=True, stable=True).indices]
    order = order[torch.sort(primary[order], descending=True, stable=True).indices]
    return order[:k]


def select_entries(spec: SparseBSpec, shapes: Mapping[str, tuple[int, ...]],
                   scores: EntryScores | None = None) -> dict[str, Any]:
    """Choose spec.k entries of B; returns a boolean mask per module, shaped like its B.

    Raises:
        ConfigError: bad budget (see `allocate`), or a gradient selection without scores.
    """
    import torch

    sizes = {n: int(math.prod(s)) for n, s in shapes.items()}
    alloc = allocate(spec.k, sizes, spec.budget)
    names = list(shapes)
    if spec.selection != "random":
        if scores is None:
            raise ConfigError(f"selection {spec.selection!r} needs gradient scores; fix: run score_entries first")
        missing = [n for n in names if n not in scores.mean_abs]
        if missing:
            raise ConfigError(f"the scores do not cover module {missing[0]}; fix: score the same adapter")
    gen = torch.Generator().manual_seed(int(spec.seed))
    flat: dict[str, Any] = {n: torch.zeros(sizes[n], dtype=torch.bool) for n in names}
    if alloc is not None:  # per module
        for n in names:
            if spec.selection == "random":
                idx = torch.randperm(sizes[n], generator=gen)[: alloc[n]]
            else:
                idx = _top(*_sort_keys(scores, spec.selection, n), alloc[n], gen)
            flat[n][idx] = True
    else:  # global
        offsets, o = {}, 0
        for n in names:
            offsets[n] = o
            o += sizes[n]
        if spec.selection == "random":
            idx = torch.randperm(o, generator=gen)[: spec.k]
        else:
            keys = [_sort_keys(scores, spec.selection, n) for n in names]
            primary = torch.cat([p for p, _ in keys])
            secondary = None if keys[0][1] is None else torch.cat([s for _, s in keys])
            idx = _top(primary, secondary, spec.k, gen)
        allmask = torch.zeros(o, dtype=torch.bool)
        allmask[idx] = True
        for n in names:
            flat[n] = allmask[offsets[n]: offsets[n] + sizes[n]].clone()
    return {n: flat[n].view(shapes[n]) for n in names}


# ---------------------------------------------------------------- masks on the model


class SparseB:
    """Masks installed on a model as gradient hooks on B (plus an optional gradient recorder)."""

    def __init__(self, peft_model, masks: Mapping[str, Any] | None, *, adapter: str = "default",
                 recorder: GradRecorder | None = None):
        self.adapter = adapter
        self.masks = dict(masks) if masks is not None else None
        self.recorder = recorder
        self._handles = []
        bs = lora_b_params(peft_model, adapter=adapter)
        if self.masks is not None:
            unknown = sorted(set(self.masks) - set(bs))
            missing = sorted(set(bs) - set(self.masks))
            if unknown or missing:
                raise ModelError(
                    f"the masks do not match the adapter: {len(missing)} adapted module(s) without a mask "
                    f"{missing[:3]}, {len(unknown)} mask(s) for modules the adapter lacks {unknown[:3]}; "
                    "fix: load masks saved with this adapter (same placement)")
            for n, p in bs.items():
                if tuple(self.masks[n].shape) != tuple(p.shape):
                    raise ModelError(f"mask of {n} has shape {tuple(self.masks[n].shape)} but its B has "
                                     f"{tuple(p.shape)}; fix: use masks saved with this adapter (same rank)")
            freeze_a(peft_model, adapter=adapter)
        for n, p in bs.items():
            m = None
            if self.masks is not None:
                m = self.masks[n].to(device=p.device, dtype=p.dtype)
            self._handles.append(p.register_hook(self._hook(n, m)))

    def _hook(self, name: str, mask):
        rec = self.recorder

        def hook(grad):
            if rec is not None:
                rec.add(name, grad)
            return grad * mask if mask is not None else grad

        return hook

    @property
    def k(self) -> int | None:
        return None if self.masks is None else int(sum(int(m.sum()) for m in self.masks.values()))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def install(peft_model, masks: Mapping[str, Any] | None, *, adapter: str = "default",
            recorder: GradRecorder | None = None) -> SparseB:
    """Freeze A and mask B's gradient (masks None: full LoRA, only the recorder is hooked)."""
    return SparseB(peft_model, masks, adapter=adapter, recorder=recorder)


def outside_mask_nonzero(peft_model, masks: Mapping[str, Any], *, adapter: str = "default") -> int:
    """Number of B entries outside the mask that are not exactly zero (0 for a sparse adapter from B = 0)."""
    n = 0
    for name, p in lora_b_params(peft_model, adapter=adapter).items():
        m = masks[name].to(p.device)
        n += int((p.detach()[~m] != 0).sum())
    return n


def save_masks(adapter_dir: str | os.PathLike, masks: Mapping[str, Any], *, meta: dict | None = None) -> Path:
    """Write the masks (as flat int64 indices of the chosen entries) and their metadata beside an adapter."""
    import torch
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: torch.nonzero(m.flatten(), as_tuple=False).flatten().to(torch.int64).contiguous()
               for n, m in masks.items()}
    doc = dict(meta or {})
    doc["shapes"] = {n: list(m.shape) for n, m in masks.items()}
    doc["k"] = int(sum(int(m.sum()) for m in masks.values()))
    doc["per_module"] = {n: int(m.sum()) for n, m in masks.items()}
    tmp = adapter_dir / f".{MASKS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "domlora-sparse-b-indices"})
    os.replace(tmp, adapter_dir / MASKS_FILE)
    write_json(adapter_dir / META_FILE, doc)
    return adapter_dir / MASKS_FILE


def has_masks(adapter_dir: str | os.PathLike) -> bool:
    return (Path(adapter_dir) / MASKS_FILE).is_file()


def load_masks(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Read masks saved by `save_masks`; returns (masks, metadata).

    Raises:
        ModelError: no masks in the folder, or a corrupt / inconsistent file.
    """
    import torch
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    mf, jf = adapter_dir / MASKS_FILE, adapter_dir / META_FILE
    if not mf.is_file() or not jf.is_file():
        raise ModelError(f"{adapter_dir} holds no sparse-B masks ({MASKS_FILE} + {META_FILE}); fix: pass the "
                         "adapter folder written by a sparse-B run, or load it as a plain LoRA adapter")
    try:
        idx = load_file(str(mf))
        meta = read_json(jf)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user-facing problem
        raise ModelError(f"cannot read the sparse-B masks in {adapter_dir}: {exc}; "
                         "fix: rerun the training stage") from None
    shapes = meta.get("shapes", {})
    masks = {}
    for n, ix in idx.items():
        if n not in shapes:
            raise ModelError(f"{jf} has no shape for module {n}; fix: rerun the training stage")
        size = int(math.prod(shapes[n]))
        if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= size):
            raise ModelError(f"mask indices of {n} fall outside its B ({size} entries); fix: rerun training")
        m = torch.zeros(size, dtype=torch.bool)
        m[ix.long()] = True
        masks[n] = m.view(shapes[n])
    return masks, meta


def load_sparse_adapter(base_model, adapter_dir: str | os.PathLike, *, is_trainable: bool = False,
                        check: bool = True):
    """Load a PEFT adapter and, if it was trained sparse, re-install its masks.

    Returns (peft_model, SparseB or None). With `check`, verifies that B is zero outside the mask.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); "
                         "fix: pass the `adapter/` folder a training stage wrote")
    pm = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    if not has_masks(adapter_dir):
        return pm, None
    masks, _ = load_masks(adapter_dir)
    if check:
        bad = outside_mask_nonzero(pm, masks)
        if bad:
            logger.warning("%d B entries outside the saved mask are non-zero in %s (trained with weight decay, "
                           "or B did not start at zero)", bad, adapter_dir)
    handle = install(pm, masks) if is_trainable else None
    if not is_trainable:
        # nothing trains, but keep the masks reachable for reporting
        pm.sparse_b_masks = masks
    return pm, handle


# ---------------------------------------------------------------- diagnostics


def landing(masks: Mapping[str, Any], module_info: Mapping[str, Mapping[str, Any]]) -> dict:
    """Where the chosen entries land: per module type and per layer.

    `module_info[name]` holds `type` and `layer` (a `Candidate.to_dict()` or a page.json row).
    `enrichment` = share of chosen entries / share of available entries (1 = as random would).
    """
    total_avail = sum(int(m.numel()) for m in masks.values())
    total_sel = sum(int(m.sum()) for m in masks.values())
    by_type: dict[str, dict] = {}
    by_layer: dict[int, dict] = {}
    for n, m in masks.items():
        info = module_info.get(n, {})
        t, layer = info.get("type", "other"), int(info.get("layer", -1))
        for key, table in ((t, by_type), (layer, by_layer)):
            row = table.setdefault(key, {"selected": 0, "available": 0, "modules": 0})
            row["selected"] += int(m.sum())
            row["available"] += int(m.numel())
            row["modules"] += 1
    for table in (by_type, by_layer):
        for row in table.values():
            row["share_selected"] = row["selected"] / total_sel if total_sel else 0.0
            row["share_available"] = row["available"] / total_avail if total_avail else 0.0
            row["density"] = row["selected"] / row["available"] if row["available"] else 0.0
            row["enrichment"] = (row["share_selected"] / row["share_available"]) if row["share_available"] else 0.0
    writers = sum(r["selected"] for t, r in by_type.items() if t in PAPER_WRITERS)
    writers_avail = sum(r["available"] for t, r in by_type.items() if t in PAPER_WRITERS)
    return {"k": total_sel, "available": total_avail, "by_type": by_type,
            "by_layer": {str(k): v for k, v in sorted(by_layer.items())},
            "vod_share": writers / total_sel if total_sel else 0.0,
            "vod_available_share": writers_avail / total_avail if total_avail else 0.0,
            "modules_with_entries": sum(1 for m in masks.values() if bool(m.any()))}


def effective_rank(singular_values) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli 2007); 1 for rank one."""
    import torch

    s = singular_values.double()
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


class GradRecorder:
    """Collects B's raw gradient (before any mask) per optimizer step and measures its structure.

    Per step: the mean over modules of the effective rank and of the top singular value's share
    of the energy of each module's B gradient (a d_out x r matrix), and the cosine between this
    step's and the previous step's gradient (all modules flattened). At the end: the effective
    rank of the step x entry matrix of gradients (how many directions the steps span).
    """

    def __init__(self, *, max_steps: int = 64, max_entries: int = 262_144, window: int = 8, seed: int = 0):
        self.max_steps = max_steps
        self.window = window
        self.max_entries = max_entries
        self.seed = seed
        self._acc: dict[str, Any] = {}
        self._prev = None
        self._subset = None
        self._traj: list = []
        self.steps: list[dict] = []

    def add(self, name: str, grad) -> None:
        if len(self.steps) >= self.max_steps:
            return
        g = grad.detach().float()
        if name in self._acc:
            self._acc[name] += g
        else:
            self._acc[name] = g.clone()

    def end_step(self, step: int | None = None) -> dict | None:
        """Close one optimizer step (call after backward, e.g. from on_step)."""
        import torch

        if not self._acc:
            return None
        names = sorted(self._acc)
        eranks, tops = [], []
        for n in names:
            g = self._acc[n]
            s = torch.linalg.svdvals(g.double())
            if float(s.sum()) == 0.0:
                continue
            eranks.append(effective_rank(s))
            tops.append(float(s[0] ** 2 / (s ** 2).sum()))
        flat = torch.cat([self._acc[n].flatten() for n in names])
        cos = None
        if self._prev is not None and self._prev.numel() == flat.numel():
            denom = float(flat.norm() * self._prev.norm())
            cos = float(flat @ self._prev) / denom if denom > 0 else 0.0
        self._prev = flat
        if self._subset is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._subset = (torch.randperm(flat.numel(), generator=gen)[: self.max_entries]
                            if flat.numel() > self.max_entries else torch.arange(flat.numel()))
        self._traj.append(flat[self._subset].clone())
        row = {"step": step if step is not None else len(self.steps) + 1,
               "grad_norm": float(flat.norm()),
               "effective_rank": sum(eranks) / len(eranks) if eranks else 0.0,
               "top_sv_share": sum(tops) / len(tops) if tops else 0.0,
               "cos_prev": cos}
        self.steps.append(row)
        self._acc = {}
        return row

    def summary(self) -> dict:
        import statistics

        import torch

        if not self.steps:
            return {"steps": 0}
        cos = [r["cos_prev"] for r in self.steps if r["cos_prev"] is not None]
        out = {"steps": len(self.steps),
               "effective_rank_mean": statistics.fmean(r["effective_rank"] for r in self.steps),
               "top_sv_share_mean": statistics.fmean(r["top_sv_share"] for r in self.steps),
               "cos_prev_mean": statistics.fmean(cos) if cos else None,
               "abs_cos_prev_mean": statistics.fmean(abs(c) for c in cos) if cos else None}
        traj = [t for t in self._traj if float(t.norm()) > 0]

        def span(rows):
            M = torch.stack(rows).double()
            s = torch.linalg.svdvals(M / M.norm(dim=1, keepdim=True))
            return effective_rank(s), float(s[0] ** 2 / (s ** 2).sum())

        if len(traj) >= 2:
            out["trajectory_effective_rank"], out["trajectory_top_sv_share"] = span(traj)
            out["trajectory_steps"] = len(traj)
        # the same over a fixed window, so runs of different lengths compare
        if len(traj) >= self.window:
            er, top = span(traj[: self.window])
            out[f"trajectory_effective_rank_first{self.window}"] = er
            out[f"trajectory_top_sv_share_first{self.window}"] = top
        return out


# ---------------------------------------------------------------- shared by the SFT and GRPO runs


def resolve_placement(placement) -> list[str]:
    """Module names from a placement: a Placement, its dict, a placement JSON path, or a list of names."""
    if isinstance(placement, Placement):
        return list(placement.modules)
    if isinstance(placement, (list, tuple)):
        names = [str(n) for n in placement]
    elif isinstance(placement, dict):
        names = Placement.from_dict(placement).modules
    elif isinstance(placement, (str, os.PathLike)):
        p = Path(placement)
        if not p.is_file():
            raise ConfigError(f"placement file {p} does not exist; fix: run `domlora select` first")
        names = Placement.from_dict(read_json(p)).modules
    else:
        raise ConfigError(f"cannot read a placement from {type(placement).__name__}; pass a Placement, its dict, "
                          "a placement JSON path or a list of module names")
    if not names:
        raise ConfigError("the placement names no modules; fix: select at least one module")
    return names


def attach_lora(model, modules: list[str], *, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0):
    """A plain LoRA adapter on exactly `modules` (A seeded), through `domlora.adapters.variants.attach`."""
    import torch

    torch.manual_seed(seed)
    return attach(model, list(modules), variant="lora", rank=rank, alpha=alpha, dropout=dropout)


def module_info(model) -> dict[str, dict]:
    """name -> {type, layer, d_in, d_out} for every candidate projection."""
    return {c.name: c.to_dict() for c in find_candidates(model)}


def make_masks(peft_model, spec: SparseBSpec, loss_fn: Callable[[int], Any] | None, *,
               adapter: str = "default", show_progress: bool = False) -> tuple[dict[str, Any], dict]:
    """Score (unless random) and select; returns (masks, a scoring report with wall times)."""
    bs = lora_b_params(peft_model, adapter=adapter)
    allocate(spec.k, {n: p.numel() for n, p in bs.items()}, spec.budget)  # fail before any scoring
    scores = None
    report: dict[str, Any] = {"selection": spec.selection, "budget": spec.budget, "probe_steps": 0,
                              "score_seconds": 0.0}
    if spec.selection != "random":
        if loss_fn is None:
            raise ConfigError(f"selection {spec.selection!r} needs a probe loss to score entries")
        scores = score_entries(peft_model, loss_fn, steps=spec.probe_steps, adapter=adapter,
                               show_progress=show_progress)
        report |= {"probe_steps": scores.steps, "score_seconds": scores.seconds, "probe_losses": scores.losses}
        sa = [float(v.mean()) for v in scores.sign_agreement.values()]
        report["mean_sign_agreement"] = sum(sa) / len(sa)
    t0 = time.perf_counter()
    masks = select_entries(spec, {n: tuple(p.shape) for n, p in bs.items()}, scores)
    report["select_seconds"] = time.perf_counter() - t0
    report["seconds"] = report["score_seconds"] + report["select_seconds"]
    if scores is not None:
        chosen = [float(scores.sign_agreement[n][m].mean()) for n, m in masks.items() if bool(m.any())]
        report["chosen_sign_agreement"] = sum(chosen) / len(chosen) if chosen else 0.0
    return masks, report


# ---------------------------------------------------------------- the SFT stage

# LoRA variants whose adapter is a plain (A, B) pair while training
SFT_VARIANTS = ("lora", "rslora")
# the study's diagnostics travel with the adapter (landing, scoring, gradient structure, eval samples)
DIAGNOSTICS = "diagnostics.json"
_WORK = ".sparse_b"


def _loss_summary(losses: list[float], n: int = 5) -> tuple[float | None, float | None]:
    if not losses:
        return None, None
    n = max(1, min(n, len(losses) // 2 or 1))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def sparse_b_sft(*, model, train_data: str | os.PathLike, placement, out_dir: str | os.PathLike, cfg,
                 spec: SparseBSpec | None, eval_data: str | os.PathLike | None = None, n_eval: int | None = 40,
                 eval_max_new_tokens: int = 96, eval_batch_size: int = 8, show_progress: bool = False) -> dict:
    """SFT stage for sparse-B LoRA: score + select k entries of B, train them through `train.loop.train`.

    Writes `out_dir/adapter/` (the PEFT adapter `train` writes, plus the masks), `out_dir/train_metrics.json`
    (`train`'s record, whose `study` holds the sparse-B settings as run and their outcome) and
    `out_dir/adapter/diagnostics.json`. A killed run resumes: `train` continues from its checkpoint and the
    chosen masks are reused (kept in `out_dir/.sparse_b/` until the run finishes).

    Args:
        model: a `ModelSpec` or its id (`embedded`, a hub id, a folder), or a LoadedModel.
        train_data: chat JSONL (`{"messages": [...]}` per line).
        placement: a Placement, its dict / JSON path, module names, or None (every projection).
        cfg: the `train.TrainConfig` (variant lora or rslora); its seed seeds everything: A's init, the
            data order, the selection and the probe batches.
        spec: the k entries of B and how they are chosen, or None for full LoRA (reference).
        eval_data: optional rows with `question` + `answer`: greedy exact match after training.

    Returns:
        The study's outcome (also in the record's `study["outcome"]`).
    """
    import dataclasses
    import hashlib
    import json
    import shutil

    if cfg.variant not in SFT_VARIANTS:
        raise ConfigError(f"sparse-B training needs a plain LoRA (A, B) pair, but the train config has variant "
                          f"{cfg.variant!r}; fix: variant one of {', '.join(SFT_VARIANTS)}")
    seed = cfg.seed
    spec = None if spec is None else dataclasses.replace(spec, seed=seed)
    k, selection = (None, None) if spec is None else (spec.k, spec.selection)
    out_dir = Path(out_dir)
    label = method_label("sft", k, selection)
    study = {"sparse_b": None if spec is None else spec.to_dict()}
    # the masks a killed run chose are reused only by a run of the same configuration
    digest = hashlib.sha256(json.dumps({"study": study, "cfg": dataclasses.asdict(cfg), "data": str(train_data)},
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    # validate the inputs before the model loads
    samples = read_samples(train_data, limit=cfg.limit_samples)
    eval_rows = read_prompts(eval_data, limit=n_eval) if eval_data is not None else None

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=cfg.device)
    model_name = getattr(loaded, "spec", "model")
    tok = loaded.tokenizer
    info = module_info(loaded.model)
    recorder = GradRecorder(max_steps=64, seed=seed)
    held: dict[str, Any] = {}
    work = out_dir / _WORK

    def hook(net):
        held["net"] = net
        masks, scoring = None, None
        if spec is not None:
            if has_masks(work):
                cached, meta = load_masks(work)
                if meta.get("config_digest") == digest:
                    masks, scoring = cached, meta.get("scoring")
                    logger.info("reusing the B masks chosen before the interruption (%s)", work)
            if masks is None:
                loss_fn = None
                if spec.selection != "random":
                    encoded, _ = encode_samples(tok, samples, max_length=cfg.max_length)
                    loss_fn = sft_probe_loss(net, encoded, pad_id=tok.pad_token_id, batch_size=spec.probe_batch_size,
                                             seed=seed)
                masks, scoring = make_masks(net, spec, loss_fn, show_progress=show_progress)
                save_masks(work, masks, meta={"config_digest": digest, "scoring": scoring})
        held["masks"], held["scoring"] = masks, scoring
        held["handle"] = install(net, masks, recorder=recorder)

    def on_step(step: int, m: dict) -> None:
        recorder.end_step(step)

    try:
        tdoc = train(model=loaded, train_data=train_data, placement=placement, out_dir=out_dir, cfg=cfg,
                     on_step=on_step, model_hook=hook, study=study, show_progress=show_progress)
    finally:
        if "handle" in held:
            held["handle"].remove()
    net, masks, scoring = held["net"], held["masks"], held["scoring"]
    warnings: list[str] = []
    leaked = outside_mask_nonzero(net, masks) if masks is not None else 0
    if leaked:
        msg = f"{leaked} B entries outside the mask are non-zero after training"
        logger.warning(msg)
        warnings.append(msg)
    ev = None
    if eval_rows is not None:
        ev = arith_accuracy(net, tok, eval_rows, max_new_tokens=eval_max_new_tokens, batch_size=eval_batch_size,
                            show_progress=show_progress)
    modules = list(lora_layers(net))
    sizes = b_sizes(net)
    land = landing(masks, info) if masks is not None else None
    if masks is not None:
        save_masks(out_dir / "adapter", masks, meta={"spec": spec.to_dict(), "modules": modules, "regime": "sft"})
    train_s = float(tdoc.get("train_time_s") or 0.0)
    score_s = float(scoring["seconds"]) if scoring else 0.0
    first, last = _loss_summary(tdoc.get("loss", []))
    metrics = _sft_outcome(tdoc, label=label, k=k, selection=selection, spec=spec, seed=seed, model_name=model_name,
                           modules=modules, masks=masks, sizes=sizes, train_s=train_s, score_s=score_s, first=first,
                           last=last, ev=ev, leaked=leaked, land=land, recorder=recorder, warnings=warnings)
    diagnostics = {"regime": "sft", "method": label, "landing": land, "scoring": scoring,
                   "grad_steps": recorder.steps, "grad_summary": recorder.summary(),
                   "eval_samples": None if ev is None else ev["samples"]}
    write_json(out_dir / "adapter" / DIAGNOSTICS, diagnostics)
    tdoc["study"] = study | {"outcome": metrics}
    write_json(out_dir / "train_metrics.json", tdoc)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("%s: loss %.4f -> %.4f, eval accuracy %s, scoring %.2fs = %.2f%% of training", label,
                first or float("nan"), last or float("nan"), None if ev is None else f"{ev['accuracy']:.3f}",
                score_s, 100 * metrics["score_fraction"])
    return metrics


def _sft_outcome(tdoc: dict, *, label, k, selection, spec, seed, model_name, modules, masks, sizes, train_s, score_s,
                 first, last, ev, leaked, land, recorder, warnings) -> dict:
    """The run's outcome: what the report reads (`study.outcome` of its record)."""
    metrics = {
        "status": "success", "regime": "sft", "method": label, "k": k,
        "selection": None if k is None else selection, "budget": None if spec is None else spec.budget, "seed": seed,
        "model": model_name, "n_modules": len(modules),
        "trainable_entries": (int(sum(int(m.sum()) for m in masks.values())) if masks is not None
                              else int(tdoc.get("trainable_params", 0))),
        "b_entries": sum(sizes.values()), "train_seconds": train_s, "steps": tdoc.get("completed_steps"),
        "score_seconds": score_s, "score_fraction": score_s / train_s if train_s > 0 else 0.0,
        "loss_first": first, "loss_last": last, "loss_final": (tdoc.get("loss") or [None])[-1],
        "loss_curve": tdoc.get("loss", []),
        "eval": None if ev is None else {k_: v for k_, v in ev.items() if k_ != "samples"},
        "eval_accuracy": None if ev is None else ev["accuracy"],
        "outside_mask_nonzero": leaked, "vod_share": land["vod_share"] if land else None,
        "landing_by_type": None if land is None else {t: r["share_selected"] for t, r in land["by_type"].items()},
        "grad": recorder.summary(), "warnings": warnings,
    }
    return metrics


def method_label(regime: str, k: int | None, selection: str | None) -> str:
    return f"{regime}_full_lora" if k is None else f"{regime}_sparse_{selection}"

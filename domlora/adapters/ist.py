"""IST: Importance-aware Sparse Tuning (Yao et al., Findings of EMNLP 2024), a training-time placement.

Adapters sit on every module of the placement (typically all seven types in all layers), but
each optimizer step updates only a sampled subset of *layers* (all adapted modules within
them); the others are frozen for that step, so backward stops at the lowest active layer.

Our reading of the paper (two loops):
- fine-tuning loop: keep a score s_l per adapted layer; each step sample `k` layers without
  replacement, favouring high scores (Gumbel-top-k on s / temperature, so every layer keeps a
  chance: with all scores equal this is uniform sampling), and update only their adapters;
- importance loop: every `update_every` steps, measure the "response suppression" of the
  layers just updated: the loss on the step's first micro-batch with their adapters switched
  off minus the loss with all adapters on (both without gradients, after the update), relative
  to the latter. Layers whose adapters matter raise the loss when suppressed; their scores
  move towards that reward by an exponential moving average, s_l <- beta s_l + (1 - beta) r.
What we could read offline is the paper's abstract and method overview, not its code: the
active fraction (25% by default), the sampling rule, the reward normalisation and the interval
are our choices, all configurable.
Unselected layers keep their adapters unchanged: their parameters get no gradient at all
(`requires_grad` off), so AdamW skips them (no momentum drift).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass

from domlora.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ISTConfig:
    """IST settings."""

    active_layers: float = 0.25
    """layers updated per step: a fraction (< 1) of the adapted layers, or a count (>= 1)"""
    update_every: int = 10
    """optimizer steps between importance updates"""
    beta: float = 0.9
    """EMA factor for the scores"""
    temperature: float = 1.0
    """sampling temperature on the scores (small = greedy top-k)"""

    def __post_init__(self):
        if not self.active_layers > 0:
            raise ConfigError(f"ist_active_layers must be > 0 (a fraction < 1 or a count), got {self.active_layers}")
        if self.active_layers >= 1 and self.active_layers != int(self.active_layers):
            raise ConfigError(f"ist_active_layers >= 1 must be a whole count, got {self.active_layers}")
        if self.update_every < 1:
            raise ConfigError(f"ist_update_every must be >= 1, got {self.update_every}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"ist_beta must be in [0, 1), got {self.beta}")
        if not self.temperature > 0:
            raise ConfigError(f"ist_temperature must be > 0, got {self.temperature}")


class ISTController:
    """Per-layer scores, per-step layer sampling, adapter (de)activation and score updates."""

    def __init__(self, model, cfg: ISTConfig, *, seed: int = 0):
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        from domlora.modules import BLOCK_RE

        self.cfg = cfg
        self.seed = seed
        self.tuners: dict[int, list] = {}
        self.params: dict[int, list] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, BaseTunerLayer):
                continue
            m = BLOCK_RE.search(name)
            if m is None:
                raise ConfigError(f"IST needs adapters inside numbered Transformer blocks; {name} is not in one")
            layer = int(m.group(1))
            self.tuners.setdefault(layer, []).append(mod)
            names = getattr(mod, "adapter_layer_names", ())
            ps = [p for n in names if hasattr(mod, n) for p in getattr(mod, n).parameters()]
            self.params.setdefault(layer, []).extend(p for p in ps if p.requires_grad)
        if not self.tuners:
            raise ConfigError("IST trains adapters; this model has none (variant `full` cannot be used with IST); "
                              "fix: use a LoRA-type variant")
        self.layers = sorted(self.tuners)
        n = len(self.layers)
        a = cfg.active_layers
        self.k = max(1, min(n, int(a) if a >= 1 else math.ceil(a * n)))
        self.scores = torch.zeros(n, dtype=torch.float64)
        self.selected_count = torch.zeros(n, dtype=torch.long)
        logger.info("IST: %d adapted layers, %d active per step", n, self.k)

    def sample(self, step: int) -> list[int]:
        """The layers updated at optimizer step `step` (deterministic in seed, step and scores)."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(len(self.layers), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        keys = self.scores / self.cfg.temperature - torch.log(-torch.log(u))
        idx = torch.topk(keys, self.k).indices.tolist()
        return sorted(self.layers[i] for i in idx)

    def activate(self, active: list[int]) -> None:
        """Let only the adapters of `active` layers receive gradients."""
        on = set(active)
        for layer in self.layers:
            flag = layer in on
            for p in self.params[layer]:
                p.requires_grad_(flag)
        for layer in active:
            self.selected_count[self.layers.index(layer)] += 1

    def activate_all(self) -> None:
        for layer in self.layers:
            for p in self.params[layer]:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def suppressed(self, layers: list[int]):
        """Switch the adapters of `layers` off (their output is the base layer's) inside the block."""
        mods = [m for layer in layers for m in self.tuners[layer]]
        old = [m._disable_adapters for m in mods]
        try:
            for m in mods:
                m._disable_adapters = True
            yield
        finally:
            for m, o in zip(mods, old):
                m._disable_adapters = o

    def update(self, active: list[int], loss_full: float, loss_suppressed: float) -> float:
        """Move the scores of `active` towards the suppression reward; returns the reward."""
        reward = (loss_suppressed - loss_full) / max(abs(loss_full), 1e-8)
        if not math.isfinite(reward):
            return reward
        b = self.cfg.beta
        for layer in active:
            i = self.layers.index(layer)
            self.scores[i] = b * self.scores[i] + (1 - b) * reward
        return reward

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "selected_count": self.selected_count.clone(),
                "layers": list(self.layers), "k": self.k, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["layers"]) != self.layers or state["k"] != self.k:
            raise ConfigError("the IST checkpoint does not match this model's adapted layers")
        self.scores = state["scores"].clone()
        self.selected_count = state["selected_count"].clone()

    def summary(self) -> dict:
        return {"layers": self.layers, "active_per_step": self.k,
                "scores": [round(float(s), 6) for s in self.scores],
                "times_selected": [int(c) for c in self.selected_count], "config": asdict(self.cfg)}

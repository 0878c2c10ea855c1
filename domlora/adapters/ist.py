"""IST: Importance-aware Sparse Tuning (Yao et al., Findings of EMNLP 2024), and its RST ablation.

Adapters sit on every module of the placement (typically all seven types in all layers), but
each optimizer step updates only a sampled subset of *layers* (all adapted modules within
them); the others are frozen for that step, so backward stops at the lowest active layer.

What the reference does (github.com/antgroup/importance-aware-sparse-tuning-IST-paper, `ist.py`,
class `ISTCallback`, read at commit 9436fd8; later commits change only the README):

- one score per layer, `importance_score`, starting at 0;
- every step (the callback's `on_step_begin`), before the step: pick `int(0.25 * n_layers)`
  layers (floor) by `torch.multinomial` *without* replacement with weights
  `sigmoid(-score)`, and let only their adapter parameters require grad. Equal scores give
  uniform sampling;
- every 10 optimizer steps (`global_step % 10 == 0 and global_step > 0`, at the start of the
  next step, so never after the last one), the importance update on a *fresh* batch: the next
  batch of a separate, shuffled loader over the training set (its own batch size 16, which is
  also the reference runs' global batch size), then 3 rollouts (`rl_step = 3`). Each rollout:
  - draws `int(0.5 * n_layers)` layers to suppress by `multinomial` without replacement with
    weights `sigmoid(score)`, and redraws until this set differs from the earlier rollouts' sets;
  - suppresses them by multiplying their adapters' `scaling` by 0.25
    (`response_suppression_factor`; scaled down, not removed), all other layers at full scale;
  - measures the batch's loss in eval mode (dropout off) without gradients;
- reward per rollout: `exp(-loss)`, minus the mean over the rollouts (no std division);
- with `p = sigmoid(score)` taken once before the update, every layer that was **suppressed** in
  rollout k gets `score += reward_k * p * (1 - p) * 10` (`rl_lr = 10`); kept layers get nothing
  (a symmetric update for them is commented out in the reference);
- so, despite its name, a high score marks a layer whose suppression cost little loss: it is
  suppressed more often in rollouts and trained *less* often (weight `sigmoid(-score)`). A layer
  whose suppression raises the loss sees below-mean rewards, its score falls, and it is trained
  more often.

`finetune.py` also offers `--use_rst` (Random Sparse Tuning, the paper's ablation), importing
`RSTCallback` from an `rst.py` that the repository does not contain. We implement RST as the
same per-step layer sampling with the importance loop off (scores stay 0, so the selection is
uniform among the layers).

Where we differ, and why:
- randomness comes from generators derived from (seed, step) instead of the global torch RNG,
  so a resumed run repeats the uninterrupted run's choices exactly, and every DDP rank picks
  the same layers;
- the fresh batch is a seeded, independent permutation of the training set consumed one
  global batch (`batch_size x grad_accum x devices` samples) per update, instead of a separate
  loader with a fixed batch of 16. It is resumable and matches the reference runs, whose global
  batch was 16. The loss is the training objective: masked cross-entropy over the target tokens,
  token-weighted over the micro-batches and the ranks;
- counts are floored like the reference's but never below 1 (the reference would train 0
  layers of a 3-layer model);
- the reference redraws the suppression set until it is new, and would loop forever when there
  are fewer distinct sets than rollouts. We reject that configuration up front, and accept a
  repeated set after 1000 redraws, which only happens when the scores are extreme;
- an update whose rollout loss is NaN is skipped (the reference would make every score NaN);
- the layers are those that carry adapters (the reference counts every block of the model;
  with the vanilla all-module placement they are the same);
- suppression scales PEFT's per-adapter `scaling` entry (what the reference's own PEFT fork
  keeps as `scaling`); DoRA's magnitude vector is not scaled, which matches the reference's DoRA.

All the constants above are settable (`ISTConfig`, mapped from `TrainConfig.ist_*`).
Unselected layers keep their adapters unchanged: their parameters get no gradient at all
(`requires_grad` off), so AdamW skips them (no momentum drift).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass

from domlora.errors import ConfigError
from domlora.modules import BLOCK_RE

logger = logging.getLogger(__name__)

MODES = ("ist", "rst")
_MAX_REDRAWS = 1000


def _count(value: float, n: int) -> int:
    """A fraction (< 1) of n layers, floored like the reference, or a whole count, within 1..n."""
    return max(1, min(n, int(value) if value >= 1 else int(value * n)))


@dataclass(frozen=True)
class ISTConfig:
    """IST settings; defaults are the reference implementation's."""

    mode: str = "ist"
    """ist (importance-weighted layer sampling, scores learnt by rollouts) | rst (uniform, no rollouts)"""
    active_layers: float = 0.25
    """layers updated per step: a fraction (< 1, floored, at least 1) of the adapted layers, or a count (>= 1)"""
    update_every: int = 10
    """optimizer steps between importance updates"""
    rollouts: int = 3
    """rollouts per importance update, each with a different set of suppressed layers"""
    suppressed_layers: float = 0.5
    """layers suppressed per rollout: a fraction (< 1, floored, at least 1) or a count (>= 1)"""
    suppression_factor: float = 0.25
    """a suppressed layer's adapters run at this fraction of their scale (0 = switched off)"""
    score_lr: float = 10.0
    """step size of the score update (reward x p(1 - p) x score_lr)"""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"IST mode {self.mode!r} is unknown; fix: use one of {', '.join(MODES)}")
        for name, example in (("active_layers", "0.25"), ("suppressed_layers", "0.5")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"ist_{name} = {v!r} is invalid; fix: a fraction of the layers in (0, 1) "
                                  f"such as {example}, or a whole count >= 1")
            if v >= 1 and v != int(v):
                raise ConfigError(f"ist_{name} = {v!r} is neither a fraction < 1 nor a whole count; fix: a "
                                  f"fraction such as {example} or a whole count such as {math.floor(v)}")
        if not (isinstance(self.update_every, numbers.Integral) and self.update_every >= 1):
            raise ConfigError(f"ist_update_every = {self.update_every!r} is invalid; fix: a whole number of "
                              "optimizer steps >= 1 (the reference uses 10)")
        if not (isinstance(self.rollouts, numbers.Integral) and self.rollouts >= 2):
            raise ConfigError(f"ist_rollouts = {self.rollouts!r} is invalid: rewards are centred on the rollouts' "
                              "mean, so fewer than 2 rollouts never change a score; fix: an integer >= 2 "
                              "(the reference uses 3)")
        if not 0 <= self.suppression_factor < 1:
            raise ConfigError(f"ist_suppression_factor = {self.suppression_factor!r} is invalid; fix: a scale in "
                              "[0, 1) for the suppressed adapters (the reference uses 0.25; 0 switches them off)")
        if not (math.isfinite(self.score_lr) and self.score_lr > 0):
            raise ConfigError(f"ist_score_lr = {self.score_lr!r} is invalid; fix: a finite number > 0 "
                              "(the reference uses 10)")


class ISTController:
    """Per-layer scores, per-step layer sampling, adapter (de)activation and the importance update.

    The training loop calls, per optimizer step: `sample(step)` and `activate(layers)` before it,
    and after it, when `due(done, total)`, `update_importance(loss_fn, step=done)` where
    `loss_fn()` returns the loss on a fresh batch with the adapters as they are (the controller
    scales the suppressed layers down, switches the model to eval mode and turns off gradients
    around each call).
    """

    def __init__(self, model, cfg: ISTConfig, *, seed: int = 0):
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.cfg = cfg
        self.seed = seed
        self.model = model
        self.tuners: dict[int, list] = {}
        self.params: dict[int, list] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, BaseTunerLayer):
                continue
            m = BLOCK_RE.search(name)
            if m is None:
                raise ConfigError(f"IST needs adapters inside numbered Transformer blocks; {name} is not in one; "
                                  "fix: place adapters only on the blocks' projections")
            if not isinstance(getattr(mod, "scaling", None), dict):
                raise ConfigError(f"IST suppresses a layer by scaling its adapters' output, but {name} "
                                  f"({type(mod).__name__}) has no per-adapter `scaling`; fix: use lora, dora, "
                                  "lora_plus, rslora, gralora or norm with IST")
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
        self.k = _count(cfg.active_layers, n)
        self.m = _count(cfg.suppressed_layers, n)
        if cfg.mode == "ist" and math.comb(n, self.m) < cfg.rollouts:
            raise ConfigError(f"IST needs {cfg.rollouts} different sets of suppressed layers per update, but "
                              f"{n} adapted layer(s) with {self.m} suppressed allow only {math.comb(n, self.m)}; "
                              f"fix: lower ist_rollouts to {max(2, math.comb(n, self.m))} or less, change "
                              "ist_suppressed_layers, adapt more layers, or use rst")
        self.scores = torch.zeros(n, dtype=torch.float64)
        """the reference's `importance_score`: high = suppressing the layer cost little = trained less often"""
        self.selected_count = torch.zeros(n, dtype=torch.long)
        self.updates = 0
        self.last_update: dict | None = None
        logger.info("%s: %d adapted layers, %d active per step%s", cfg.mode.upper(), n, self.k,
                    f", {self.m} suppressed per rollout" if cfg.mode == "ist" else "")

    # -- randomness: one generator per (seed, purpose, step), so resumed runs repeat every draw

    def _generator(self, purpose: str, step: int):
        import torch

        h = hashlib.sha256(f"{self.seed}:{purpose}:{step}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

    # -- the fine-tuning loop

    def train_weights(self):
        """Per-layer sampling weights of the layers to train: sigmoid(-score) (uniform under rst)."""
        return (-self.scores).sigmoid()

    def sample(self, step: int) -> list[int]:
        """The layers updated at optimizer step `step` (deterministic in seed, step and scores)."""
        import torch

        idx = torch.multinomial(self.train_weights(), self.k, replacement=False,
                                generator=self._generator("train", step))
        return sorted(self.layers[i] for i in idx.tolist())

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

    # -- the importance loop

    def due(self, done: int, total: int) -> bool:
        """Whether an importance update follows optimizer step `done` (1-based) of `total` (never under rst)."""
        return self.cfg.mode == "ist" and done % self.cfg.update_every == 0 and done < total

    @contextlib.contextmanager
    def suppressed(self, layers: list[int], factor: float | None = None):
        """Scale the adapters of `layers` by `factor` (default the config's) inside the block."""
        factor = self.cfg.suppression_factor if factor is None else factor
        mods = [m for layer in layers for m in self.tuners[layer]]
        saved = [dict(m.scaling) for m in mods]
        try:
            for m in mods:
                for a in m.active_adapters:
                    if a in m.scaling:
                        m.scaling[a] = m.scaling[a] * factor
            yield
        finally:
            for m, s in zip(mods, saved):
                m.scaling.clear()
                m.scaling.update(s)

    def _draw_suppressed(self, g, previous: list[list[int]]) -> list[int]:
        import torch

        w = self.scores.sigmoid()
        for _ in range(_MAX_REDRAWS):
            pick = sorted(torch.multinomial(w, self.m, replacement=False, generator=g).tolist())
            if pick not in previous:
                return pick
        logger.warning("IST: no new set of suppressed layers in %d draws (extreme scores); repeating one",
                       _MAX_REDRAWS)
        return pick

    def update_importance(self, loss_fn: Callable[[], float], *, step: int) -> dict | None:
        """Run the rollouts after optimizer step `step` and update the scores; returns what was measured.

        `loss_fn()` must return the loss on a fresh batch under the adapters' current scales; it
        is called once per rollout. Under rst nothing is measured (returns None).
        """
        import torch

        if self.cfg.mode != "ist":
            return None
        g = self._generator("suppress", step)
        picks: list[list[int]] = []
        losses: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for _ in range(self.cfg.rollouts):
                    pick = self._draw_suppressed(g, picks)
                    picks.append(pick)
                    with self.suppressed([self.layers[i] for i in pick]):
                        losses.append(float(loss_fn()))
        finally:
            self.model.train(was_training)
        record = {"step": step, "suppressed": [[self.layers[i] for i in p] for p in picks], "losses": losses}
        if any(math.isnan(x) for x in losses):
            logger.warning("IST: a rollout loss is NaN at step %d; scores left unchanged", step)
            self.last_update = record | {"rewards": None}
            return self.last_update
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        rewards = [r - mean for r in rewards]
        p = self.scores.sigmoid()
        grad = p * (1 - p) * self.cfg.score_lr
        for pick, r in zip(picks, rewards):
            for i in pick:
                self.scores[i] += r * grad[i]
        self.updates += 1
        self.last_update = record | {"rewards": rewards}
        return self.last_update

    # -- state

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "selected_count": self.selected_count.clone(),
                "updates": self.updates, "last_update": self.last_update, "layers": list(self.layers),
                "k": self.k, "m": self.m, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["layers"]) != self.layers or state["k"] != self.k or state.get("m", self.m) != self.m:
            raise ConfigError("the IST checkpoint does not match this model's adapted layers; fix: delete the "
                              "run's checkpoints/ folder to start over")
        self.scores = state["scores"].clone()
        self.selected_count = state["selected_count"].clone()
        self.updates = int(state.get("updates", 0))
        self.last_update = state.get("last_update")

    def summary(self) -> dict:
        w = self.train_weights()
        return {"mode": self.cfg.mode, "layers": self.layers, "active_per_step": self.k,
                "suppressed_per_rollout": self.m if self.cfg.mode == "ist" else 0,
                "scores": [round(float(s), 6) for s in self.scores],
                "first_draw_prob": [round(float(x), 6) for x in w / w.sum()],
                "times_selected": [int(c) for c in self.selected_count], "importance_updates": self.updates,
                "last_update": self.last_update, "config": asdict(self.cfg)}

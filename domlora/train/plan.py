"""Which samples each optimizer step uses: a seeded permutation per epoch, the same on every process."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from domlora.train.config import TrainConfig

@dataclass
class StepPlan:
    """Which samples each optimizer step uses: a seeded permutation per epoch, concatenated."""

    n: int
    per_step: int
    """samples per optimizer step over all devices"""
    total_steps: int
    seed: int

    @classmethod
    def make(cls, n: int, cfg: TrainConfig, world: int) -> StepPlan:
        per_step = cfg.batch_size * cfg.grad_accum * world
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n / per_step))
        return cls(n=n, per_step=per_step, total_steps=total, seed=cfg.seed)

    def _epoch(self, e: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + e).shuffle(order)
        return order

    def step_samples(self, step: int) -> list[int]:
        start = step * self.per_step
        out: list[int] = []
        while len(out) < self.per_step:
            e, off = divmod(start + len(out), self.n)
            out += self._epoch(e)[off: off + self.per_step - len(out)]
        return out

    def micro_batches(self, step: int, *, rank: int, world: int, batch_size: int, lengths: list[int]) -> list[list[int]]:
        mine = self.step_samples(step)[rank::world]
        mine.sort(key=lambda i: (lengths[i], i))  # less padding; grouping stays deterministic
        return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


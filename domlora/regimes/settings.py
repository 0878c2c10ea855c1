"""The settings of the regimes beyond plain SFT, as a method's `sparse_b:` and `grpo:` sections validate into
(`pipeline.params` reads them without loading the regimes themselves)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from domlora.errors import ConfigError

SELECTIONS = ("random", "informed", "magnitude")
BUDGETS = ("global", "per_module")

Selection = Literal["random", "informed", "magnitude"]
Budget = Literal["global", "per_module"]

@dataclass(frozen=True)
class SparseBSpec:
    """How many B entries to train and how to choose them."""

    k: int
    """trainable entries in total (over all adapted modules)"""
    selection: Selection = "informed"
    """random | informed (sign-consistent gradient) | magnitude (gradient magnitude)"""
    budget: Budget = "global"
    """global: the k best entries anywhere; per_module: k split over modules in proportion to B's size"""
    probe_steps: int = 4
    """S gradient evaluations the informed / magnitude scores average over"""
    probe_batch_size: int = 4
    """samples per probe step (SFT scoring)"""
    seed: int = 0
    """seed of the random selection and of the probe batches"""

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ConfigError(f"k must be an integer number of B entries, got {self.k!r}")
        if self.k <= 0:
            raise ConfigError(f"k must be >= 1 (the number of trainable B entries), got {self.k}; "
                              "fix: pass a positive budget, or train full LoRA (k = None where supported)")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; valid: {', '.join(BUDGETS)}")
        if self.probe_steps < 1:
            raise ConfigError(f"probe_steps must be >= 1, got {self.probe_steps}")
        if self.selection == "informed" and self.probe_steps < 2:
            raise ConfigError("the informed selection compares gradient signs across probe steps, so it needs "
                              f"probe_steps >= 2, got {self.probe_steps}")
        if self.probe_batch_size < 1:
            raise ConfigError(f"probe_batch_size must be >= 1, got {self.probe_batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_reward_weights(answer_weight: float, format_weight: float) -> None:
    """GRPO's reward weights: both >= 0, not both 0."""
    if answer_weight < 0 or format_weight < 0 or answer_weight + format_weight <= 0:
        raise ConfigError("reward weights must be >= 0 and not both 0, got "
                          f"answer_weight={answer_weight}, format_weight={format_weight}")


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's own settings (a method's `grpo:` section). The LoRA shape, learning rate, schedule,
    steps and seed come from the method's `TrainConfig`, and sparse-B from its `sparse_b:` section,
    so the one configuration says what ran."""

    prompts_per_step: int = 2
    """distinct prompts per step (each gets `num_generations` completions)"""
    num_generations: int = 4
    """group size G"""
    max_completion_length: int = 64
    """tokens generated per completion"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    reward_answer_weight: float = 1.0
    """reward of a correct final answer"""
    reward_format_weight: float = 0.2
    """reward of a parsable `#### <int>` line"""
    probe_max_tries: int = 4
    """sparse-B probe: redraw a probe step on new prompts (up to this many times) while all its groups have
    constant rewards"""
    n_train: int | None = None
    """use only the first n training prompts"""
    n_eval: int | None = 40
    """evaluate on the first n eval rows"""
    eval_max_new_tokens: int = 96
    """greedy tokens per evaluation answer"""
    eval_batch_size: int = 8
    """evaluation prompts per generation batch"""
    eval_base: bool = False
    """also evaluate the model before training (same rows)"""
    system_prompt: str | None = None
    """prepended as a system turn to every prompt (training and evaluation)"""

    def __post_init__(self):
        checks = {"prompts_per_step": self.prompts_per_step, "max_completion_length": self.max_completion_length,
                  "probe_max_tries": self.probe_max_tries, "eval_max_new_tokens": self.eval_max_new_tokens,
                  "eval_batch_size": self.eval_batch_size}
        for k, v in checks.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"grpo.{k} must be an integer >= 1, got {v!r}")
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations must be >= 2 (GRPO compares completions within a group), "
                              f"got {self.num_generations}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature must be > 0 for sampling, got {self.temperature}")
        for k in ("n_train", "n_eval"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"grpo.{k} must be None or an integer >= 1, got {v!r}")
        check_reward_weights(self.reward_answer_weight, self.reward_format_weight)

    def to_dict(self) -> dict:
        return asdict(self)

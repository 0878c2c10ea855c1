"""The placement peers' options (`OPTIONS`, validated by `parse_options`) and the data split each reads
(`DATA`): what params.yaml and the select stage check before `domlora.peers` loads any model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from domlora.config import from_dict
from domlora.errors import ConfigError

DOC_KIND = "peer"
ALETHEIA_EXTRA = "pipeline"
ALETHEIA_PIN = "aletheia-lora==0.1.2"
EVA_TYPES_NOTE = "every candidate projection (EVA redistributes LoRA's rank budget over them)"


@dataclass(frozen=True)
class KappaOptions:
    """KappaTune (PEFT's helper)."""

    top_p: float = 0.2
    """the helper's default: the fraction of analysed linear modules with the lowest condition numbers"""
    num_modules: int | None = None
    """keep this many modules with the lowest condition numbers instead (1: the top-1-module form)"""
    max_dim_size_to_analyze: int = 16384
    """the helper's default: weights with a larger dimension are not analysed"""

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"kappa option top_p must be in (0, 1], got {self.top_p}")
        if self.num_modules is not None and self.num_modules < 1:
            raise ConfigError(f"kappa option num_modules must be >= 1, got {self.num_modules}")


@dataclass(frozen=True)
class AletheiaOptions:
    """Aletheia (the `aletheia-lora` package)."""

    top_pct: float = 50.0
    """the package's default: the top percent of layers by gradient norm"""
    num_layers: int | None = None
    """keep this many layers instead (1: the top-1-layer form)"""
    probe_batches: int = 5
    """the package's default: probe samples (batches of one)"""
    chunk_size: int = 8
    """the package's default: layers whose gradients are enabled at once"""
    seed: int = 42
    """the package's default: which probe samples are drawn"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    """the package's default target modules, adapted in every chosen layer"""

    def __post_init__(self):
        if not 1 <= self.top_pct <= 100:
            raise ConfigError(f"aletheia option top_pct must be in [1, 100], got {self.top_pct}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"aletheia option num_layers must be >= 1, got {self.num_layers}")
        if self.probe_batches < 1 or self.chunk_size < 1:
            raise ConfigError("aletheia options probe_batches and chunk_size must be >= 1")
        if not self.target_modules:
            raise ConfigError("aletheia option target_modules must name at least one module")


@dataclass(frozen=True)
class EvaOptions:
    """EVA (PEFT). In a pipeline method these come from its training keys (`rank`, `alpha`, `eva_*`), so the
    select stage computes the allocation the training initialisation will compute."""

    rank: int = 64
    """LoRA rank r: the budget is r x the number of projections"""
    alpha: float = 128.0
    """LoRA alpha (EVA rescales it with the redistributed rank)"""
    rho: float = 2.0
    """PEFT's default: a projection gets at most rho x r"""
    tau: float = 0.99
    """PEFT's default: cosine similarity at which the incremental SVD has converged"""
    samples: int = 64
    """training samples (the first N of the file) EVA's SVD reads"""
    batch_size: int = 16
    """samples per forward pass (each batch needs at least rho x r target tokens)"""
    max_length: int = 3072
    """tokens per sample"""

    def __post_init__(self):
        if self.rank < 1 or self.samples < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("eva options rank, samples, batch_size must be >= 1 and max_length >= 2")
        if self.rho < 1:
            raise ConfigError(f"eva option rho must be >= 1 (PEFT's rule), got {self.rho}")
        if not 0 <= self.tau <= 1:
            raise ConfigError(f"eva option tau must be in [0, 1], got {self.tau}")


@dataclass(frozen=True)
class MassiveOptions:
    """The forward-only `massive` predictor."""

    rule: Literal["onset", "largest_jump", "largest_output"] = "onset"
    """which down_proj it picks (`domlora.probes.massive`)"""
    batch_size: int = 8
    """samples per forward pass"""


OPTIONS = {"kappa": KappaOptions, "aletheia": AletheiaOptions, "eva": EvaOptions, "massive": MassiveOptions}
"""peer -> its options; every placement strategy that needs the model is here"""
# what each peer reads from the data: nothing, the probe split, the training split
DATA = {"kappa": None, "aletheia": "probe", "eva": "train", "massive": "probe"}


def parse_options(peer: str, options: dict | None):
    """Validate a peer's options; an unknown option is named with the allowed ones."""
    if peer not in OPTIONS:
        raise ConfigError(f"{peer!r} is not a placement peer; peers: {', '.join(OPTIONS)}")
    return from_dict(OPTIONS[peer], options or {}, where=f"{peer} option")

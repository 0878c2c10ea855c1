"""params.yaml: the grid and every hyper-parameter, per profile, validated before any work starts.

params.yaml holds `profiles: {embedded: ..., paper: ...}` and `run:`, a YAML alias of the active
profile (`run: *embedded`). A cell is model x dataset x method x seed; a method is a whole recipe:
a placement strategy plus overrides of the one training schema (`train.TrainConfig`: any of its
fields, written flat beside the placement keys) and the typed sections of the studies
(`sparse_b:`, `grpo:`), so the variants, ablations and rank sweep of the paper are methods too.
A method may be restricted to some models (`models:`) and give its explicit layers per model.

`Params.cells()` is the grid; `pipeline.grid` writes it to grid.yaml, which dvc.yaml expands, so
DVC's stage names and the cells agree by construction.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from domlora.config import ModelSpec, check_keys, close_matches, from_dict
from domlora.errors import ConfigError
from domlora.io import write_text
from domlora.models import known_num_layers
from domlora.peer_options import OPTIONS, parse_options
from domlora.placement import STRATEGIES
from domlora.regimes.settings import GRPOSettings, SparseBSpec
from domlora.train.config import TrainConfig

__all__ = ["BudgetSpec", "Cell", "DatasetSpec", "EvalSpec", "GridSpec", "MethodSpec", "ModelSpec", "Params",
           "ProbeSpec", "TrackingSpec", "TuneSpec", "load_params", "parse_profile", "read_params_file", "use_profile"]

SLUG = re.compile(r"^[a-z0-9][a-z0-9_]*$")
PAPER_TABLES = (1, 2, 3, 4, 5, 10, 11, 12)


@dataclass(frozen=True)
class DatasetSpec:
    """A training dataset and the evaluation tasks of the cells trained on it."""

    source: str = "arith"
    """a name in `domlora.data.DATASETS`"""
    path: str | None = None
    """a local file or hub id overriding the source's default"""
    n_train: int = 256
    """training samples"""
    n_probe: int = 32
    """probe samples (PAGE's N)"""
    n_eval: int = 50
    """held-out evaluation samples (generated tasks)"""
    tasks: list[str] = field(default_factory=list)
    """evaluation tasks or suites for cells trained on this dataset"""
    label: str | None = None
    """name in reports"""
    stand_in: bool = False
    """generate rows in the source's hub schema instead of downloading it (the offline rehearsal)"""


@dataclass(frozen=True)
class ProbeSpec:
    """The step-0 probe (PAGE, NFN) of every model on every probe set."""

    samples: int = 32
    """probe samples N"""
    max_length: int | None = None
    """tokens per sample; None = the training max_length (what the adapter will be trained on)"""
    max_lengths: dict[str, int] = field(default_factory=dict)
    """a probe set's own tokens per sample (dataset slug -> length), long enough that at most a few of its
    samples are cut (code solutions run longer than arithmetic); the others take `max_length`"""
    alpha: float = 16.0
    """LoRA alpha PAGE is computed for (the ranking does not depend on it)"""
    rank: int = 8
    """LoRA rank PAGE is computed for"""
    batch_size: int | Literal["auto"] = "auto"
    """samples per forward/backward; `auto`: the largest whose batches fit `memory_fraction` of the free memory
    (on a CPU also at most 1024 padded tokens a batch); the scores do not depend on it"""
    memory_fraction: float = 0.5
    """the probe's memory budget: this share of the free memory after the weights"""
    nfn: bool = True
    """also compute PLoP's NFN"""
    nfn_form: Literal["reference", "squared"] = "reference"
    """`reference`: the PLoP authors' estimator on the raw task prompts (a forward pass of its own); `squared`: the
    paper's per-token squared ratio on the probe samples (same pass as PAGE); docs/probe.md"""
    activations: bool = True
    """also compute the activation statistics behind the `massive` predictor (same pass)"""
    reuse_from: str | None = None
    """a probe set whose scores every dataset of a backbone selects from (the paper's rule: find the dominant
    module once per backbone, reuse it across tasks); None = each dataset's own probe"""

    def __post_init__(self):
        if self.samples < 1 or (self.max_length is not None and self.max_length < 2) or self.rank < 1 \
                or any(not isinstance(v, int) or v < 2 for v in self.max_lengths.values()) \
                or self.alpha <= 0 or (self.batch_size != "auto" and self.batch_size < 1) \
                or not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"probe values out of range (samples, rank, batch_size >= 1 or auto; max_length >= 2; "
                              f"alpha > 0; 0 < memory_fraction <= 1): {self}")


@dataclass(frozen=True)
class MethodSpec:
    """A training recipe: where adapters go and how they are trained."""

    placement: str = "dom"
    """placement strategy (`domlora.placement.STRATEGIES`)"""
    k: int = 3
    """modules for page_topk / random; module types for plop"""
    types: list[str] = field(default_factory=list)
    """module types (or ffn_all / attn_all) for `types` and `explicit`"""
    layers: list[int] | dict[str, list[int]] = field(default_factory=list)
    """layers for `explicit` (negative counts from the end), or per model slug"""
    models: list[str] = field(default_factory=list)
    """run only on these model slugs (empty: every model of the grid)"""
    tables: list[int] = field(default_factory=list)
    """paper tables this method belongs to"""
    label: str | None = None
    """name in reports"""
    peer: dict[str, Any] = field(default_factory=dict)
    """options of a placement peer (`domlora.peer_options.OPTIONS`: kappa, aletheia, massive; eva's are train keys)"""
    budget: str | None = None
    """budget class, or tier (a key of the profile's `tune.budgets`): compared with the tier's methods at (nearly)
    equal trainable parameters, each at the learning rate its own sweep chose"""
    budget_params: float | None = None
    """`page_budget` / `page_rank`: trainable LoRA parameters to spend"""
    budget_fraction: float | None = None
    """`page_budget` / `page_rank`: the budget as a fraction of vanilla LoRA's parameters at the method's rank"""
    total_rank: int | None = None
    """`page_rank`: the total rank spread over its modules by PAGE (instead of a parameter budget)"""
    max_modules: int | None = None
    """`page_rank`: spread over the top this-many modules by PAGE (None: every candidate)"""
    match_tier: bool = False
    """give the placement's modules the one rank at which its parameters match its tier's reference (a peer or a
    random draw whose modules differ in size from the reference's), as PEFT `rank_pattern`"""
    train: dict[str, Any] = field(default_factory=dict)
    """overrides of `train.TrainConfig` (written flat in params.yaml, beside the keys above)"""
    sparse_b: SparseBSpec | None = None
    """budgeted entries of B (A frozen): the k entries and how they are chosen"""
    grpo: GRPOSettings | None = None
    """train with GRPO (verifiable arithmetic reward) instead of SFT"""

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"a method's k must be >= 1, got {self.k}")

    def layers_for(self, model: str) -> list[int]:
        return list(self.layers.get(model, [])) if isinstance(self.layers, dict) else list(self.layers)

    def runs_on(self, model: str) -> bool:
        return not self.models or model in self.models


METHOD_KEYS = tuple(f.name for f in dataclasses.fields(MethodSpec) if f.name != "train")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# a cell's seed is the grid's, never a method's
_CELL_OWNED = ("seed",)


@dataclass(frozen=True)
class BudgetSpec:
    """A budget class: methods compared at equal budget, trained at one learning rate chosen for the class."""

    lrs: list[float] = field(default_factory=list)
    """candidate peak learning rates, each trained with every method of the class at the tuning seed"""
    modules: int | None = None
    """a placement of this class adapts exactly this many modules (checked when it is selected); None: any"""
    seeds: list[int] | None = None
    """the grid seeds the class's methods run (None: all of `grid.seeds`)"""
    label: str | None = None
    """name in reports"""
    reference: str | None = None
    """a method whose trainable parameters are the tier's on each model: every method of the tier is within
    15% of it (checked when it is selected; `pipeline.tiers`)"""
    steps: list[int] | None = None
    """candidate training lengths (optimizer steps), shortest first: the tier trains the first at which every
    method's tuning run at its chosen rate has flattened (None: the profile's `max_steps`)"""
    extend: int = 2
    """how many times the tune stage may extend a method's rate grid past an edge (one grid step each)"""
    on_edge: Literal["fail", "keep"] = "fail"
    """a rate still at an edge after `extend` extensions fails the tune stage with the fix (`fail`), or is kept
    and marked in the tune file and the report (`keep`: for wiring checks such as placement_ci, never results)"""

    def __post_init__(self):
        if self.seeds is not None and not self.seeds:
            raise ConfigError("a budget class's `seeds` must list at least one seed (or be left out: all)")
        if len(self.lrs) < 2 or any(not lr > 0 for lr in self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"a budget class needs a log grid of at least two distinct learning rates > 0 to sweep, "
                              f"got {self.lrs}; fix: e.g. lrs: [5.0e-4, 1.5e-3, 5.0e-3] (three, so that the chosen "
                              "rate can be interior)")
        if sorted(self.lrs) != list(self.lrs):
            raise ConfigError(f"a budget class's `lrs` must be in increasing order (a log grid), got {self.lrs}; "
                              f"fix: lrs: {sorted(self.lrs)}")
        if self.steps is not None and (not self.steps or sorted(set(self.steps)) != list(self.steps)
                                       or self.steps[0] < 1):
            raise ConfigError(f"a tier's `steps` lists candidate step counts >= 1, increasing, got {self.steps}")
        if self.extend < 0:
            raise ConfigError(f"a tier's `extend` must be >= 0, got {self.extend}")
        if self.modules is not None and self.modules < 1:
            raise ConfigError(f"a budget class's `modules` must be >= 1, got {self.modules}")


@dataclass(frozen=True)
class TuneSpec:
    """The learning-rate sweep of each budget class, on a validation split carved from the training data."""

    budgets: dict[str, BudgetSpec] = field(default_factory=dict)
    """budget class slug -> its candidate learning rates"""
    val_samples: int = 64
    """the last N samples of each training split: scored by the sweep, trained on by no run of a tuned method"""
    seed: int = 0
    """the seed of every sweep run"""
    reuse_from: str | None = None
    """a dataset whose sweep sets the learning rates of every dataset (None: each dataset sweeps its own)"""

    def __post_init__(self):
        if not self.budgets:
            raise ConfigError("`tune.budgets` must declare at least one budget class")
        if self.val_samples < 8:
            raise ConfigError(f"`tune.val_samples` must be >= 8, got {self.val_samples}")
        if self.seed < 0:
            raise ConfigError(f"`tune.seed` must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation settings shared by every cell."""

    limit: int | None = None
    """examples per task (None = all; smoke runs only)"""
    batch_size: int | str = "auto"
    """examples per forward pass, or auto"""
    max_gen_toks: int | None = None
    """cap on generated tokens (None = each task's own)"""
    allow_code_exec: bool = False
    """run generated code (HumanEval) in the sandbox"""
    stand_in: bool = False
    """evaluate on stand-in rows in each benchmark's schema, MT-Bench graded by a loopback stand-in judge
    (the offline rehearsal: never benchmark numbers)"""


@dataclass(frozen=True)
class TrackingSpec:
    """MLflow."""

    enabled: bool = True
    """log to MLflow"""
    uri: str = "sqlite:///mlflow.db"
    """tracking URI ($MLFLOW_TRACKING_URI wins)"""
    experiment: str = "domlora"
    """experiment name"""


@dataclass(frozen=True)
class GridSpec:
    """The axes of the grid."""

    models: list[str] = field(default_factory=list)
    """model slugs trained on"""
    probe_models: list[str] = field(default_factory=list)
    """models probed on every probe set (a superset of `models`; default: `models`)"""
    probe_datasets: list[str] = field(default_factory=list)
    """datasets prepared and probed (a superset of `datasets`)"""
    datasets: list[str] = field(default_factory=list)
    """datasets trained on"""
    methods: list[str] = field(default_factory=list)
    """method slugs"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """seeds"""


@dataclass(frozen=True)
class CheckpointStudySpec:
    """The paper's Figure 2: PAGE on full fine-tuning checkpoints (does the dominant module stay put?)."""

    dataset: str = "tulu"
    """the dataset fine-tuned on and probed"""
    steps: list[int] = field(default_factory=lambda: [0, 1, 50, 100, 200, 390])
    """optimizer steps whose checkpoints are probed (0 = the pretrained model)"""
    models: list[str] = field(default_factory=list)
    """model slugs (empty: every model of the grid)"""
    lr: float | None = None
    """learning rate of the full fine-tuning (default: train.lr)"""

    def __post_init__(self):
        if not self.steps or any(s < 0 for s in self.steps):
            raise ConfigError(f"checkpoints.steps must be a non-empty list of steps >= 0, got {self.steps}")


@dataclass(frozen=True)
class Cell:
    """One grid cell; `id` is its DVC stage suffix (`train@<id>`) and its run folder."""

    model: str
    dataset: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.dataset}-{self.method}-{self.seed}"

    @classmethod
    def parse(cls, cell_id: str) -> Cell:
        return cls(*split_id(cell_id, what="cell", form="MODEL-DATASET-METHOD-SEED"))


def split_id(run_id: str, *, what: str, form: str, prefix: str = "") -> tuple[str, str, str, int]:
    """`MODEL-DATASET-METHOD-<prefix>N` -> (model, dataset, method, N): the ids of cells and sweep runs."""
    parts = run_id.split("-")
    if len(parts) != 4 or not parts[3].startswith(prefix) or not parts[3][len(prefix):].isdigit():
        raise ConfigError(f"{what} id {run_id!r} must be {form}")
    return parts[0], parts[1], parts[2], int(parts[3][len(prefix):])


@dataclass(frozen=True)
class Params:
    """One profile of params.yaml, validated."""

    profile: str
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    methods: dict[str, MethodSpec]
    probe: ProbeSpec
    train: TrainConfig
    eval: EvalSpec
    tracking: TrackingSpec
    grid: GridSpec
    seed_data: int = 0
    checkpoints: CheckpointStudySpec | None = None
    tune: TuneSpec | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def cells(self, *, models=None, datasets=None, methods=None, seeds=None) -> list[Cell]:
        """The grid (model, dataset, method, seed in that order), optionally a subset; a method restricted to
        some models has cells on those models only."""
        axes = [self.grid.models, self.grid.datasets, self.grid.methods, self.grid.seeds]
        picks = [models, datasets, methods, seeds]
        for name, axis, pick in zip(("models", "datasets", "methods", "seeds"), axes, picks):
            if pick:
                bad = [p for p in pick if p not in axis]
                if bad:
                    raise ConfigError(f"{name} {bad} not in this profile's grid; choose from {axis}")
        axes = [[v for v in axis if not pick or v in pick] for axis, pick in zip(axes, picks)]
        return [Cell(*t) for t in itertools.product(*axes) if self.methods[t[2]].runs_on(t[0])
                and t[3] in self.method_seeds(t[2])]

    def method_seeds(self, method: str) -> list[int]:
        """The grid seeds a method runs: its budget class's `seeds`, else all of them."""
        b = self.methods[method].budget
        if b is not None and self.tune is not None and self.tune.budgets[b].seeds is not None:
            return [s for s in self.grid.seeds if s in self.tune.budgets[b].seeds]
        return list(self.grid.seeds)

    def methods_in_tables(self, tables) -> list[str]:
        """The grid's methods that belong to any of the paper `tables` (e.g. [5]: the ablations)."""
        bad = [t for t in tables if t not in PAPER_TABLES]
        if bad:
            raise ConfigError(f"tables {bad} are not paper tables; choose from {list(PAPER_TABLES)}")
        return [m for m in self.grid.methods if set(self.methods[m].tables) & set(tables)]

    def train_config(self, method: str, *, seed: int = 0) -> TrainConfig:
        """The resolved `TrainConfig` of a method: the profile's `train:` with the method's overrides and the seed."""
        m = self.methods[method]
        base = dataclasses.asdict(self.train)
        return from_dict(TrainConfig, base | m.train | {"seed": seed}, where=f"methods.{method}")

    def train_config_for_study(self, study: CheckpointStudySpec) -> TrainConfig:
        """The recipe of the checkpoint study's full fine-tuning: `train:` with variant full and the study's lr."""
        base = dataclasses.asdict(self.train) | {"variant": "full", "layer_sampling": "none"}
        if study.lr is not None:
            base["lr"] = study.lr
        return from_dict(TrainConfig, base, where="checkpoints")

    def checkpoint_studies(self) -> list[tuple[str, str]]:
        """(model, dataset) pairs of the Figure 2 study (none without a `checkpoints:` section)."""
        c = self.checkpoints
        return [] if c is None else [(m, c.dataset) for m in (c.models or self.grid.models)]

    def budget_methods(self, budget: str) -> list[str]:
        """The grid's methods of a budget class, in grid order."""
        return [m for m in self.grid.methods if self.methods[m].budget == budget]

    def tune_dataset(self, dataset: str) -> str:
        """The dataset whose sweep sets a dataset's learning rates."""
        return self.tune.reuse_from or dataset

    def tuned_samples(self, dataset: str) -> int:
        """Training samples a tuned method trains on: the training split minus its last `tune.val_samples`."""
        return self.datasets[dataset].n_train - self.tune.val_samples

    def select_probe(self, dataset: str) -> str:
        """The probe set a dataset's placements are selected from."""
        return self.probe.reuse_from or dataset

    def probe_max_length(self, dataset: str | None = None) -> int:
        """The probe's tokens per sample on a probe set: the set's own length, else the probe's, else what
        training uses."""
        if dataset is not None and dataset in self.probe.max_lengths:
            return self.probe.max_lengths[dataset]
        return self.probe.max_length if self.probe.max_length is not None else self.train.max_length

    def grid_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:10]


PROFILE_KEYS = ("profile", "models", "datasets", "methods", "probe", "train", "eval", "tracking", "grid",
                "seed_data", "checkpoints", "tune")


def _table(name: str, d: dict, key: str, parse) -> dict:
    raw = d[key]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"params.yaml: `{name}.{key}` must be a non-empty mapping of slug -> settings")
    out = {}
    for slug, v in raw.items():
        if not SLUG.match(str(slug)):
            raise ConfigError(f"params.yaml: `{name}.{key}.{slug}`: slugs are lowercase letters, digits and _ "
                              "(no `-` or `@`, which DVC uses in stage names)")
        out[str(slug)] = parse(f"{name}.{key}.{slug}", v)
    return out


def _parse_method(where: str, d, base: TrainConfig) -> MethodSpec:
    if not isinstance(d, dict):
        raise ConfigError(f"params.yaml: `{where}` must be a mapping of settings")
    check_keys(where, d, METHOD_KEYS + tuple(k for k in TRAIN_KEYS if k not in _CELL_OWNED))
    own = {k: v for k, v in d.items() if k in METHOD_KEYS}
    over = {k: v for k, v in d.items() if k not in METHOD_KEYS}
    m = from_dict(MethodSpec, own, where=where)
    # the overrides are checked here, with the base they apply to, before any work starts
    resolved = from_dict(TrainConfig, dataclasses.asdict(base) | over, where=where)
    if m.placement not in STRATEGIES:
        raise ConfigError(f"params.yaml: `{where}.placement` is {m.placement!r}{close_matches(m.placement, STRATEGIES)}; "
                          f"allowed: {', '.join(sorted(STRATEGIES))}")
    bad = [t for t in m.tables if t not in PAPER_TABLES]
    if bad:
        raise ConfigError(f"params.yaml: `{where}.tables` has {bad}; allowed: {list(PAPER_TABLES)}")
    if m.grpo is not None and m.placement not in ("all", "explicit", "types", "dom", "page_argmax", "page_topk"):
        raise ConfigError(f"params.yaml: `{where}`: GRPO trains a LoRA on a fixed placement; {m.placement!r} is not one")
    _check_peer(where, m, resolved)
    _check_placement_budget(where, m, resolved)
    if m.budget is not None and "lr" in over:
        raise ConfigError(f"params.yaml: `{where}` is in budget class {m.budget!r}, whose learning rate the sweep "
                          "chooses for every method of the class; fix: remove its `lr`")
    return dataclasses.replace(m, train=over)


def _check_placement_budget(where: str, m: MethodSpec, cfg: TrainConfig) -> None:
    """A `page_budget` / `page_rank` budget in one unit, only where it is read: before any model loads."""
    from domlora.placement import PlacementSpec

    try:
        PlacementSpec(strategy=m.placement, k=m.k, budget=m.budget_params, budget_fraction=m.budget_fraction,
                      total_rank=m.total_rank, max_modules=m.max_modules, rank=cfg.rank, alpha=cfg.alpha)
    except ConfigError as exc:
        msg = str(exc).replace("budget=", "budget_params: ").replace("budget_fraction=", "budget_fraction: ")
        raise ConfigError(f"params.yaml: `{where}`: {msg}") from None
    if m.placement == "page_rank" and cfg.variant not in ("lora", "lora_plus", "rslora", "norm", "dora"):
        raise ConfigError(f"params.yaml: `{where}`: page_rank gives each module its own rank, which variant "
                          f"{cfg.variant!r} does not take; fix: variant lora (or dora, rslora, lora_plus, norm)")


def _check_peer(where: str, m: MethodSpec, cfg: TrainConfig) -> None:
    """Peer options only for the strategies that take them, each option known to its peer."""
    if m.placement == "eva":
        if m.peer:
            raise ConfigError(f"params.yaml: `{where}.peer`: EVA's settings are training keys (rank, alpha, eva_rho, "
                              "eva_tau, eva_samples, eva_batch_size), so that the placement and the initialisation "
                              "agree; fix: move them out of `peer`")
        if cfg.lora_init != "eva":
            raise ConfigError(f"params.yaml: `{where}` places by EVA but trains with PEFT's default initialisation; "
                              "fix: add `lora_init: eva`")
    elif m.peer:
        if m.placement not in OPTIONS:
            raise ConfigError(f"params.yaml: `{where}.peer`: strategy {m.placement!r} takes no peer options; peer "
                              f"options belong to {', '.join(p for p in OPTIONS if p != 'eva')}")
        try:
            parse_options(m.placement, m.peer)
        except ConfigError as exc:
            raise ConfigError(f"params.yaml: `{where}.peer`: {exc}") from None


def parse_profile(d: dict, *, name: str = "run") -> Params:
    """Validate one profile dict; errors name the key, the allowed values and the closest match."""
    if not isinstance(d, dict):
        raise ConfigError(f"params.yaml: profile `{name}` must be a mapping")
    try:
        check_keys(name, d, PROFILE_KEYS)
        for key in ("models", "datasets", "methods", "grid"):
            if key not in d:
                raise ConfigError(f"profile `{name}` lacks `{key}`")
        train = from_dict(TrainConfig, d.get("train"), where=f"{name}.train")
        models = _table(name, d, "models", lambda w, v: from_dict(ModelSpec, v, where=w))
        datasets = _table(name, d, "datasets", lambda w, v: from_dict(DatasetSpec, v, where=w))
        methods = _table(name, d, "methods", lambda w, v: _parse_method(w, v, train))
        grid = from_dict(GridSpec, d["grid"], where=f"{name}.grid")
        _check_grid(name, grid, models, datasets, methods)
        probe = from_dict(ProbeSpec, d.get("probe"), where=f"{name}.probe")
        if probe.reuse_from is not None and probe.reuse_from not in (grid.probe_datasets or grid.datasets):
            raise ConfigError(f"`{name}.probe.reuse_from` is {probe.reuse_from!r}"
                              f"{close_matches(probe.reuse_from, grid.probe_datasets)}, which is not a probe set of the "
                              f"grid; allowed: {', '.join(grid.probe_datasets or grid.datasets)}")
        unknown = [k for k in probe.max_lengths if k not in datasets]
        if unknown:
            raise ConfigError(f"`{name}.probe.max_lengths` names {', '.join(unknown)}"
                              f"{close_matches(unknown[0], list(datasets))}, not a dataset of the profile; "
                              f"allowed: {', '.join(datasets)}")
        if not grid.probe_datasets:
            grid = dataclasses.replace(grid, probe_datasets=list(grid.datasets))
        if not grid.probe_models:
            grid = dataclasses.replace(grid, probe_models=list(grid.models))
        checkpoints = None
        if d.get("checkpoints") is not None:
            checkpoints = from_dict(CheckpointStudySpec, d["checkpoints"], where=f"{name}.checkpoints")
            bad = [x for x in checkpoints.models if x not in grid.models]
            if checkpoints.dataset not in (grid.probe_datasets or grid.datasets) or bad:
                what = f"model {bad[0]!r}" if bad else f"dataset {checkpoints.dataset!r}"
                raise ConfigError(f"`{name}.checkpoints` names {what}, which is not in the grid; fix: one of "
                                  f"{grid.models if bad else grid.probe_datasets or grid.datasets}")
        tune = from_dict(TuneSpec, d["tune"], where=f"{name}.tune") if d.get("tune") is not None else None
        _check_budgets(name, tune, grid, methods, datasets)
        return Params(profile=str(d.get("profile", name)), models=models, datasets=datasets, methods=methods,
                      checkpoints=checkpoints,
                      probe=probe, train=train, tune=tune,
                      eval=from_dict(EvalSpec, d.get("eval"), where=f"{name}.eval"),
                      tracking=from_dict(TrackingSpec, d.get("tracking"), where=f"{name}.tracking"), grid=grid,
                      seed_data=from_dict(_SeedData, {"seed_data": d.get("seed_data", 0)}, where=name).seed_data,
                      raw=d)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("params.yaml") else f"params.yaml: {msg}") from None


@dataclass(frozen=True)
class _SeedData:
    seed_data: int = 0


def _check_layers(name: str, slug: str, m: MethodSpec, models: dict) -> None:
    """Explicit layers must exist in every model the method runs on (where its config says how many)."""
    for model, spec in models.items():
        n = known_num_layers(spec)
        layers = m.layers_for(model)
        if isinstance(m.layers, dict) and not layers:
            raise ConfigError(f"`{name}.methods.{slug}.layers` gives no layers for model {model!r}; fix: add "
                              f"`{model}: [...]` or restrict the method with `models:`")
        bad = [x for x in layers if n is not None and not -n <= x < n]
        if bad:
            raise ConfigError(f"`{name}.methods.{slug}.layers` has layer {bad[0]}, out of range for model {model!r} "
                              f"({spec.id}: {n} layers, 0..{n - 1} or -1..-{n}); fix: a layer in range, or give "
                              "layers per model")


def _check_grid(name: str, grid: GridSpec, models: dict, datasets: dict, methods: dict) -> None:
    probe_sets = grid.probe_datasets or grid.datasets
    missing = [x for x in grid.datasets if x not in probe_sets]
    if missing:
        raise ConfigError(f"`{name}.grid.datasets` {missing} must also be in `grid.probe_datasets` "
                          "(every trained dataset is prepared and probed)")
    missing = [x for x in grid.models if grid.probe_models and x not in grid.probe_models]
    if missing:
        raise ConfigError(f"`{name}.grid.models` {missing} must also be in `grid.probe_models` (every trained model "
                          "is probed)")
    # a probe-only profile (the `scale` study) trains nothing: models, datasets and methods all empty
    probe_only = bool(grid.probe_models) and not (grid.models or grid.datasets or grid.methods)
    for axis, known in (("models", models), ("probe_models", models), ("probe_datasets", datasets),
                        ("datasets", datasets), ("methods", methods)):
        values = {"probe_datasets": probe_sets, "probe_models": grid.probe_models or grid.models}.get(
            axis, getattr(grid, axis, None))
        if not values and probe_only and axis in ("models", "datasets", "methods"):
            continue
        if not values:
            raise ConfigError(f"`{name}.grid.{axis}` is empty; fix: name at least one, or (a probe-only profile) "
                              "leave models, datasets and methods all empty and name the probe_models")
        for v in values:
            if v not in known:
                raise ConfigError(f"`{name}.grid.{axis}` names {v!r}{close_matches(str(v), known)}, which is not "
                                  f"defined; defined: {', '.join(known)}")
    for s in grid.seeds:
        if s < 0:
            raise ConfigError(f"`{name}.grid.seeds` must be non-negative integers, got {s!r}")
    for slug, m in methods.items():
        unknown = [x for x in m.models if x not in models]
        if unknown:
            raise ConfigError(f"`{name}.methods.{slug}.models` names {unknown[0]!r}{close_matches(unknown[0], models)}, "
                              f"which is not a model of this profile; defined: {', '.join(models)}")
        if isinstance(m.layers, dict):
            unknown = [x for x in m.layers if x not in models]
            if unknown:
                raise ConfigError(f"`{name}.methods.{slug}.layers` is given for {unknown[0]!r}"
                                  f"{close_matches(unknown[0], models)}, which is not a model of this profile")
        if m.placement == "explicit" and slug in grid.methods:
            _check_layers(name, slug, m, {x: models[x] for x in grid.models if m.runs_on(x)})
        if slug in grid.methods and not any(m.runs_on(x) for x in grid.models):
            raise ConfigError(f"`{name}.methods.{slug}` runs only on {m.models}, none of which is in "
                              f"`grid.models` {grid.models}; fix: add one of them to the grid or drop the method")


def _check_budgets(name: str, tune: TuneSpec | None, grid: GridSpec, methods: dict, datasets: dict) -> None:
    """Every budget class named by a method is declared, every declared class has a method in the grid."""
    for slug, m in methods.items():
        if m.budget is None or (slug not in grid.methods and tune is not None and m.budget not in tune.budgets):
            continue  # a method outside the grid may name a tier another profile declares
        if tune is None:
            raise ConfigError(f"`{name}.methods.{slug}` is in budget class {m.budget!r}, but the profile has no "
                              "`tune:` section declaring its learning rates; fix: add `tune: {budgets: {"
                              f"{m.budget}: {{lrs: [...]}}}}}}` or drop `budget`")
        if m.budget not in tune.budgets:
            raise ConfigError(f"`{name}.methods.{slug}.budget` is {m.budget!r}{close_matches(m.budget, tune.budgets)}, "
                              f"which `tune.budgets` does not declare; declared: {', '.join(tune.budgets)}")
    if tune is None:
        return
    for b in tune.budgets:
        if not any(methods[m].budget == b for m in grid.methods):
            raise ConfigError(f"`{name}.tune.budgets.{b}` has no method in `grid.methods`; fix: give a grid method "
                              f"`budget: {b}`, or drop the class")
    for b, spec in tune.budgets.items():
        if spec.reference is not None and (spec.reference not in grid.methods
                                           or methods[spec.reference].budget != b):
            raise ConfigError(f"`{name}.tune.budgets.{b}.reference` is {spec.reference!r}, which is not a grid method "
                              f"of tier {b!r}; fix: one of {', '.join(m for m in grid.methods if methods[m].budget == b)}")
        for slug in grid.methods:
            if methods[slug].budget == b and methods[slug].match_tier and spec.reference in (None, slug):
                raise ConfigError(f"`{name}.methods.{slug}.match_tier` matches the tier's reference, and tier {b!r} "
                                  f"{'has none' if spec.reference is None else 'names this method'}; fix: set "
                                  f"`tune.budgets.{b}.reference` to another method of the tier")
        if spec.reference is not None and methods[spec.reference].placement in ("kappa", "aletheia", "eva", "massive"):
            raise ConfigError(f"`{name}.tune.budgets.{b}.reference` is {spec.reference!r}, which chooses its modules from "
                              "the model itself, so its count is known only after it runs; fix: a fixed or PAGE "
                              "placement (e.g. LoRA at the tier's rank)")
        bad = [x for x in (spec.seeds or []) if x not in grid.seeds]
        if bad:
            raise ConfigError(f"`{name}.tune.budgets.{b}.seeds` has {bad}, which are not in `grid.seeds` {grid.seeds}")
    if tune.reuse_from is not None and tune.reuse_from not in grid.datasets:
        raise ConfigError(f"`{name}.tune.reuse_from` is {tune.reuse_from!r}{close_matches(tune.reuse_from, grid.datasets)}"
                          f", which is not a trained dataset of the grid; allowed: {', '.join(grid.datasets)}")
    for ds in grid.datasets:
        if datasets[ds].n_train <= tune.val_samples:
            raise ConfigError(f"`{name}.datasets.{ds}.n_train` ({datasets[ds].n_train}) must exceed "
                              f"`tune.val_samples` ({tune.val_samples}): the validation split is carved from it")


def read_params_file(path: str | Path = "params.yaml") -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist; fix: run from the repository root or pass --params")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p} must be a mapping")
    return doc


def load_params(path: str | Path = "params.yaml", *, profile: str | None = None) -> Params:
    """Load and validate a profile (default: the active one, `run`)."""
    doc = read_params_file(path)
    try:
        check_keys("params.yaml", doc, ("profiles", "run"))
    except ConfigError as exc:
        raise ConfigError(f"params.yaml: {exc}") from None
    if profile is None:
        if "run" not in doc:
            raise ConfigError("params.yaml has no `run:` (the active profile, e.g. `run: *embedded`)")
        return parse_profile(doc["run"], name="run")
    profiles = doc.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}{close_matches(profile, profiles)}; defined: {', '.join(profiles)}")
    return parse_profile(profiles[profile], name=f"profiles.{profile}")


def use_profile(path: str | Path, profile: str) -> None:
    """Make `profile` the active one (`run: *profile`), keeping the file's anchors."""
    p = Path(path)
    text = p.read_text()
    doc = read_params_file(p)
    if profile not in (doc.get("profiles") or {}):
        raise ConfigError(f"unknown profile {profile!r}; defined: {', '.join(doc.get('profiles') or {})}")
    # restore an anchor a YAML round-trip may have dropped, then point `run` at it
    text = re.sub(rf"^(  {profile}:)(?:[ \t]*&\w+)?[ \t]*$", rf"\1 &{profile}", text, count=1, flags=re.M)
    if re.search(r"^run:.*$", text, flags=re.M):
        text = re.sub(r"^run:.*$", f"run: *{profile}", text, count=1, flags=re.M)
    else:
        text = text.rstrip("\n") + f"\nrun: *{profile}\n"

    write_text(p, text)
    load_params(p)  # still valid

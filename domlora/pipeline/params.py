"""params.yaml: the grid and every hyper-parameter, per profile, validated before any work starts.

params.yaml holds `profiles: {embedded: ..., paper: ...}` and `run:`, a YAML alias of the
active profile (`run: *embedded`). DVC expands `run.grid` with `matrix:`; Python expands
the same axes in the same order with `Params.cells()`, so stage names and cells agree.
A cell is model x dataset x method x seed; a method is a whole recipe (placement
strategy + adapter variant + overrides), so the variants, ablations and rank sweep of
the paper are methods too.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from domlora.errors import ConfigError

SLUG = re.compile(r"^[a-z0-9][a-z0-9_]*$")
PAPER_TABLES = (1, 2, 3, 4, 5, 10, 11, 12)


def _close(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _check_keys(section: str, given: dict, allowed) -> None:
    for key in given:
        if key not in allowed:
            raise ConfigError(f"params.yaml: unknown key `{section}.{key}`{_close(key, allowed)}; "
                              f"allowed keys: {', '.join(sorted(allowed))}")


def _typed(section: str, key: str, value, typ, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ConfigError(f"params.yaml: `{section}.{key}` must be {name}, got {value!r}")
    return value


def _from_dict(cls, section: str, d: dict | None):
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    _check_keys(section, d, names)
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        typ = f.metadata.get("type")
        kwargs[f.name] = _typed(section, f.name, d[f.name], typ, allow_none=f.metadata.get("none", False)) if typ else d[f.name]
    return cls(**kwargs)


def _f(default, typ, *, none: bool = False, doc: str = ""):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"type": typ, "none": none, "doc": doc})
    return field(default=default, metadata={"type": typ, "none": none, "doc": doc})


@dataclass(frozen=True)
class ModelSpec:
    id: str = _f("embedded", str, doc="`embedded`, a hub id or a local folder")
    dtype: str = _f("auto", str, doc="auto | float32 | bfloat16")
    trust_remote_code: bool = _f(False, bool)
    label: str | None = _f(None, str, none=True, doc="name in reports")


@dataclass(frozen=True)
class DatasetSpec:
    source: str = _f("arith", str, doc="a name in domlora.data.DATASETS")
    path: str | None = _f(None, str, none=True, doc="local file or hub id override")
    n_train: int = _f(256, int)
    n_probe: int = _f(32, int)
    n_eval: int = _f(50, int)
    tasks: list = _f([], list, doc="evaluation tasks or suites for cells trained on this dataset")
    label: str | None = _f(None, str, none=True)


@dataclass(frozen=True)
class ProbeSpec:
    samples: int = _f(32, int)
    max_length: int = _f(256, int)
    alpha: float = _f(16.0, float)
    rank: int = _f(8, int)
    batch_size: int = _f(4, int)
    nfn: bool = _f(True, bool)

    def __post_init__(self):
        if self.samples < 1 or self.max_length < 2 or self.rank < 1 or self.alpha <= 0 or self.batch_size < 1:
            raise ConfigError(f"params.yaml: probe values out of range: {self}")


@dataclass(frozen=True)
class TrainSpec:
    variant: str = _f("lora", str)
    rank: int = _f(64, int)
    alpha: float = _f(128.0, float)
    dropout: float = _f(0.0, float)
    lr: float = _f(2e-5, float)
    epochs: int = _f(1, int)
    max_steps: int = _f(-1, int)
    batch_size: int = _f(4, int)
    grad_accum: int = _f(8, int)
    max_length: int = _f(3072, int)
    warmup_ratio: float = _f(0.03, float)
    weight_decay: float = _f(0.0, float)
    gradient_checkpointing: bool = _f(True, bool)
    save_every: int = _f(0, int)
    dtype: str = _f("auto", str)
    deepspeed: str | None = _f(None, str, none=True)

    def __post_init__(self):
        bad = [k for k in ("rank", "batch_size", "grad_accum", "max_length", "epochs") if getattr(self, k) < 1]
        bad += [k for k in ("alpha", "lr") if getattr(self, k) <= 0]
        if bad:
            raise ConfigError(f"params.yaml: train values out of range: {', '.join(f'{k}={getattr(self, k)}' for k in bad)}")


@dataclass(frozen=True)
class MethodSpec:
    """A training recipe: where adapters go and how they are trained."""

    placement: str = _f("dom", str, doc="placement strategy (domlora.placement.STRATEGIES)")
    k: int = _f(3, int)
    types: list = _f([], list)
    layers: list = _f([], list)
    variant: str | None = _f(None, str, none=True, doc="overrides train.variant")
    rank: int | None = _f(None, int, none=True)
    alpha: float | None = _f(None, float, none=True)
    lr: float | None = _f(None, float, none=True)
    ist: bool = _f(False, bool, doc="IST: train a sampled subset of layers each step")
    sparse_b: dict | None = _f(None, dict, none=True, doc="budgeted sparse-B LoRA settings")
    grpo: bool = _f(False, bool, doc="train with GRPO instead of SFT")
    tables: list = _f([], list, doc="paper tables this method belongs to")
    label: str | None = _f(None, str, none=True)

    def __post_init__(self):
        if self.k < 1 or (self.rank is not None and self.rank < 1) or (self.alpha is not None and self.alpha <= 0) \
                or (self.lr is not None and self.lr <= 0):
            raise ConfigError(f"params.yaml: a method has k/rank/alpha/lr out of range (k, rank >= 1; alpha, lr > 0): {self}")


@dataclass(frozen=True)
class EvalSpec:
    limit: int | None = _f(None, int, none=True)
    batch_size: Any = _f("auto", (int, str))
    max_gen_toks: int | None = _f(None, int, none=True)
    allow_code_exec: bool = _f(False, bool)


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool = _f(True, bool)
    uri: str = _f("sqlite:///mlflow.db", str)
    experiment: str = _f("domlora", str)


@dataclass(frozen=True)
class GridSpec:
    models: list = _f([], list)
    probe_datasets: list = _f([], list, doc="datasets prepared and probed (a superset of `datasets`)")
    datasets: list = _f([], list, doc="datasets trained on")
    methods: list = _f([], list)
    seeds: list = _f([0], list)


@dataclass(frozen=True)
class Cell:
    """One grid cell; `id` is exactly DVC's matrix suffix (values joined by `-`)."""

    model: str
    dataset: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.dataset}-{self.method}-{self.seed}"

    @classmethod
    def parse(cls, cell_id: str) -> Cell:
        parts = cell_id.split("-")
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise ConfigError(f"cell id {cell_id!r} must be MODEL-DATASET-METHOD-SEED")
        return cls(parts[0], parts[1], parts[2], int(parts[3]))


@dataclass(frozen=True)
class Params:
    """One profile of params.yaml, validated."""

    profile: str
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    methods: dict[str, MethodSpec]
    probe: ProbeSpec
    train: TrainSpec
    eval: EvalSpec
    tracking: TrackingSpec
    grid: GridSpec
    seed_data: int = 0
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def cells(self, *, models=None, datasets=None, methods=None, seeds=None) -> list[Cell]:
        """The grid in DVC's matrix order (model, dataset, method, seed), optionally a subset."""
        axes = [self.grid.models, self.grid.datasets, self.grid.methods, self.grid.seeds]
        picks = [models, datasets, methods, seeds]
        for name, axis, pick in zip(("models", "datasets", "methods", "seeds"), axes, picks):
            if pick:
                bad = [p for p in pick if p not in axis]
                if bad:
                    raise ConfigError(f"{name} {bad} not in this profile's grid; choose from {axis}")
        axes = [[v for v in axis if not pick or v in pick] for axis, pick in zip(axes, picks)]
        return [Cell(*t) for t in itertools.product(*axes)]

    def method_train(self, method: str) -> TrainSpec:
        """train settings with a method's overrides applied."""
        m = self.methods[method]
        over = {k: getattr(m, k) for k in ("variant", "rank", "alpha", "lr") if getattr(m, k) is not None}
        return TrainSpec(**{f.name: getattr(self.train, f.name) for f in fields(TrainSpec)} | over)

    def grid_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:10]


PROFILE_KEYS = {"profile", "models", "datasets", "methods", "probe", "train", "eval", "tracking", "grid", "seed_data"}


def parse_profile(d: dict, *, name: str = "run") -> Params:
    """Validate one profile dict; errors name the key and the allowed values."""
    from domlora.placement import STRATEGIES

    if not isinstance(d, dict):
        raise ConfigError(f"params.yaml: profile `{name}` must be a mapping")
    _check_keys(name, d, PROFILE_KEYS)
    for key in ("models", "datasets", "methods", "grid"):
        if key not in d:
            raise ConfigError(f"params.yaml: profile `{name}` lacks `{key}`")
    def table(key, cls):
        raw = d[key]
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"params.yaml: `{name}.{key}` must be a non-empty mapping of slug -> settings")
        out = {}
        for slug, v in raw.items():
            if not SLUG.match(str(slug)):
                raise ConfigError(f"params.yaml: `{name}.{key}.{slug}`: slugs are lowercase letters, digits and _ "
                                  "(no `-` or `@`, which DVC uses in stage names)")
            out[str(slug)] = _from_dict(cls, f"{name}.{key}.{slug}", v)
        return out
    models, datasets, methods = table("models", ModelSpec), table("datasets", DatasetSpec), table("methods", MethodSpec)
    for slug, m in methods.items():
        if m.placement not in STRATEGIES:
            raise ConfigError(f"params.yaml: `{name}.methods.{slug}.placement` is {m.placement!r}{_close(m.placement, STRATEGIES)}; "
                              f"allowed: {', '.join(sorted(STRATEGIES))}")
        bad = [t for t in m.tables if t not in PAPER_TABLES]
        if bad:
            raise ConfigError(f"params.yaml: `{name}.methods.{slug}.tables` has {bad}; allowed: {list(PAPER_TABLES)}")
    grid = _from_dict(GridSpec, f"{name}.grid", d["grid"])
    if not grid.probe_datasets:
        grid = GridSpec(grid.models, list(grid.datasets), grid.datasets, grid.methods, grid.seeds)
    missing = [x for x in grid.datasets if x not in grid.probe_datasets]
    if missing:
        raise ConfigError(f"params.yaml: `{name}.grid.datasets` {missing} must also be in `grid.probe_datasets` "
                          "(every trained dataset is prepared and probed)")
    for axis, known in (("models", models), ("probe_datasets", datasets), ("datasets", datasets), ("methods", methods)):
        values = getattr(grid, axis)
        if not values:
            raise ConfigError(f"params.yaml: `{name}.grid.{axis}` is empty")
        for v in values:
            if v not in known:
                raise ConfigError(f"params.yaml: `{name}.grid.{axis}` names {v!r}{_close(str(v), known)}, "
                                  f"which is not defined; defined: {', '.join(known)}")
    for s in grid.seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"params.yaml: `{name}.grid.seeds` must be non-negative integers, got {s!r}")
    train = _from_dict(TrainSpec, f"{name}.train", d.get("train"))
    _check_variants(name, train, methods)
    return Params(profile=str(d.get("profile", name)), models=models, datasets=datasets, methods=methods,
                  probe=_from_dict(ProbeSpec, f"{name}.probe", d.get("probe")), train=train,
                  eval=_from_dict(EvalSpec, f"{name}.eval", d.get("eval")),
                  tracking=_from_dict(TrackingSpec, f"{name}.tracking", d.get("tracking")), grid=grid,
                  seed_data=int(d.get("seed_data", 0)), raw=d)


def _check_variants(name: str, train: TrainSpec, methods: dict[str, MethodSpec]) -> None:
    try:
        from domlora.adapters.variants import VARIANTS
    except ImportError:  # adapters not importable (e.g. a partial install): skip this check
        return
    for where, v in [(f"{name}.train.variant", train.variant)] + [
            (f"{name}.methods.{s}.variant", m.variant) for s, m in methods.items() if m.variant]:
        if v not in VARIANTS:
            raise ConfigError(f"params.yaml: `{where}` is {v!r}{_close(v, VARIANTS)}; allowed: {', '.join(VARIANTS)}")


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
    if profile is None:
        if "run" not in doc:
            raise ConfigError("params.yaml has no `run:` (the active profile, e.g. `run: *embedded`)")
        return parse_profile(doc["run"], name="run")
    profiles = doc.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}{_close(profile, profiles)}; defined: {', '.join(profiles)}")
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
    from domlora.io import write_text

    write_text(p, text)
    load_params(p)  # still valid

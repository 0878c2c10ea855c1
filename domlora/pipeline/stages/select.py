"""select stage: a placement JSON from the probe outputs, or from a strategy that reads the model itself."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from domlora.config import ModelSpec
from domlora.errors import ConfigError
from domlora.io import read_json, write_json
from domlora.models import load_model
from domlora.peer_options import DATA, parse_options
from domlora.peers import _aletheia_module, run_peer
from domlora.placement import ACTIVATION_STRATEGIES, MODEL_STRATEGIES, PlacementSpec, select
from domlora.samples import encode_samples, read_samples

logger = logging.getLogger(__name__)


def _read_scores(path: Path, what: str) -> dict:
    import json

    try:
        doc = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {path} is not valid JSON ({exc}); fix: pass the file written by "
                          "`domlora probe`") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} file {path} holds a {type(doc).__name__}, not a JSON object; fix: pass the "
                          "file written by `domlora probe`")
    return doc


def select_placement(*, probe_path: str | os.PathLike, strategy: str, out: str | os.PathLike,
                     nfn_path: str | os.PathLike | None = None, k: int = 3, types: tuple[str, ...] = (),
                     layers: tuple[int, ...] = (), seed: int = 0,
                     activations_path: str | os.PathLike | None = None, model=None,
                     data: str | os.PathLike | None = None, options: dict | None = None, samples: int | None = None,
                     max_length: int = 256, cache_dir: str | None = None, n_modules: int | None = None) -> dict:
    """Select stage: write a placement JSON (module names + evidence) from probe outputs.

    `nfn.json` (plop) and `massive.json` (massive) are read from beside the probe file unless given.
    The strategies that read the model (`placement.MODEL_STRATEGIES`: the peers kappa, aletheia, eva, and
    massive without a massive.json) load `model` (a `ModelSpec` or its id) and run on `data` (the probe
    split for aletheia and massive, the training split for eva; its first `samples` samples, eva: its
    option `samples`); their options are validated before the model is loaded, and the JSON gains the
    peer's `cost` (wall time, peak memory above the loaded model) and `scores`. With `n_modules`, a placement
    that adapts another number of modules is an error (a budget class's module count).
    """
    spec = PlacementSpec(strategy=strategy, k=k, types=tuple(types), layers=tuple(layers), seed=seed)
    probe_path = Path(probe_path)
    if not probe_path.is_file():
        raise ConfigError(f"probe file {probe_path} does not exist; fix: run `domlora probe` first")
    page = _read_scores(probe_path, "probe")
    if nfn_path and not Path(nfn_path).is_file():
        raise ConfigError(f"NFN file {nfn_path} does not exist; fix: pass the nfn.json written by `domlora probe`")
    nfn_file = Path(nfn_path) if nfn_path else probe_path.with_name("nfn.json")
    nfn = _read_scores(nfn_file, "NFN") if nfn_file.is_file() else None
    if activations_path and not Path(activations_path).is_file():
        raise ConfigError(f"activations file {activations_path} does not exist; fix: pass the massive.json written "
                          "by `domlora diagnose`")
    act_file = Path(activations_path) if activations_path else probe_path.with_name("massive.json")
    activations = _read_scores(act_file, "activations") if act_file.is_file() else None
    if options and strategy not in MODEL_STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} takes no peer options (got {', '.join(options)}); peer options "
                          f"belong to {', '.join(sorted(MODEL_STRATEGIES))}")
    if strategy in ACTIVATION_STRATEGIES and activations is not None and options:
        raise ConfigError(f"strategy {strategy!r} reads {act_file}, which the probe already computed; its options "
                          f"({', '.join(options)}) apply only when it runs its own forward passes; fix: drop them, "
                          "or set the probe's rule (`domlora probe --massive-rule`)")
    if strategy in ACTIVATION_STRATEGIES and activations is None and model is None:
        if "signals" in page and "activations" not in page["signals"]:
            raise ConfigError(f"{strategy} needs the activation statistics, but this probe ran without them "
                              "(`domlora probe --no-activations`, or `activations: false` in the probe params); fix: "
                              "rerun `domlora probe` without --no-activations, or pass --model to run the predictor's "
                              "own forward passes")
        raise ConfigError(f"{strategy} needs {act_file.name} (written by `domlora probe` beside page.json), which is "
                          f"missing; fix: pass --activations DIR/massive.json, or --model to run the predictor's own "
                          "forward passes")
    peer = None
    if strategy in MODEL_STRATEGIES and not (strategy in ACTIVATION_STRATEGIES and activations is not None):
        peer = run_model_peer(strategy, model=model, data=data, options=options, samples=samples,
                              max_length=max_length, cache_dir=cache_dir)
        if strategy in ACTIVATION_STRATEGIES:
            activations = peer
    placement = select(spec, probe=page, nfn=nfn, activations=activations,
                       peer=None if strategy in ACTIVATION_STRATEGIES else peer)
    if n_modules is not None and len(placement.modules) != n_modules:
        raise ConfigError(f"strategy {strategy!r} placed {len(placement.modules)} modules, and its budget class adapts "
                          f"exactly {n_modules}; fix: move the method to a class of its size, or change its options")
    doc = placement.to_dict() | {"probe": str(probe_path)}
    if peer is not None:
        doc |= {"cost": peer["cost"], "options": peer.get("options", {}), "data": str(data) if data else None}
        if "scores" in peer:
            doc["scores"] = peer["scores"]
    write_json(out, doc)
    return doc


def run_model_peer(strategy: str, *, model, data, options: dict | None, samples: int | None, max_length: int,
                   cache_dir: str | None = None) -> dict:
    """Load the model (and data) a model-reading strategy needs and run it (`domlora.peers.run_peer`)."""
    opts = parse_options(strategy, options)  # an unknown option fails before the model is loaded
    if strategy == "aletheia":
        _aletheia_module()  # a missing package fails before the model is loaded
    if model is None:
        raise ConfigError(f"strategy {strategy!r} reads the model; fix: pass --model (`embedded`, a hub id or a folder)")
    encoded = None
    chosen = None
    if DATA[strategy] is not None:
        if data is None:
            raise ConfigError(f"strategy {strategy!r} reads samples ({DATA[strategy]} split); fix: pass --data FILE.jsonl")

        limit = getattr(opts, "samples", None) or samples
        chosen = read_samples(data, limit=limit)

    spec = ModelSpec.of(model)
    loaded = load_model(spec, cache_dir=cache_dir)
    if chosen is not None:
        length = getattr(opts, "max_length", None) or max_length
        encoded, _ = encode_samples(loaded.tokenizer, chosen, max_length=length)
    return run_peer(strategy, loaded.model, options=options, encoded=encoded, model_name=spec.id,
                    pad_id=loaded.tokenizer.pad_token_id or 0)


def select_stage(params, model: str, dataset: str, method: str, *, layout) -> dict:
    """select: placements/<model>/<dataset>/<method>.json.

    Strategies that read the model run here on the probe set the probe read (aletheia, massive) or on the
    training split (eva, with the method's own training keys, as its initialisation will run).
    """
    m = params.methods[method]
    probe_set = params.select_probe(dataset)
    peer = {}
    if m.placement in DATA:
        split = DATA[m.placement]
        peer = {"model": params.models[model], "options": peer_options(params, method),
                "data": None if split is None else layout.split(probe_set if split == "probe" else dataset, split),
                "samples": params.probe.samples, "max_length": params.probe_max_length()}
    size = params.tune.budgets[m.budget].modules if m.budget is not None and params.tune is not None else None
    return select_placement(probe_path=layout.page_json(model, probe_set), strategy=m.placement,
                            out=layout.placement(model, dataset, method), k=m.k, types=tuple(m.types),
                            layers=tuple(m.layers_for(model)), seed=0, n_modules=size, **peer)


def peer_options(params, method: str) -> dict:
    """A model-reading method's peer options; EVA's are its training keys (so placement and init agree)."""
    m = params.methods[method]
    if m.placement != "eva":
        return dict(m.peer)
    cfg = params.train_config(method)
    return {"rank": cfg.rank, "alpha": cfg.alpha, "rho": cfg.eva_rho, "tau": cfg.eva_tau, "samples": cfg.eva_samples,
            "batch_size": cfg.eva_batch_size, "max_length": cfg.max_length}



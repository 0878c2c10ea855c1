"""`domlora registry`: the dominant module per backbone (model id + config hash), probed once and reused."""
from __future__ import annotations

import argparse
import json

from domlora.errors import ConfigError
from domlora.io import read_json
from domlora.models import config_hash, load_model, model_from_config, resolve_model_path
from domlora.pipeline.registry import DEFAULT_PATH, load_registry, lookup, record

HELP = "show, look up or record the dominant module of a backbone"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=str(DEFAULT_PATH), help=f"registry JSON (default {DEFAULT_PATH})")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("show", help="print every entry")
    lk = sub.add_parser("lookup", help="print the entry of one backbone")
    lk.add_argument("--model", required=True, help="`embedded`, a hub id or a local folder")
    lk.add_argument("--match-config", action="store_true", help="accept an entry of another id with the same config")
    rc = sub.add_parser("record", help="record a page.json for its backbone")
    rc.add_argument("--model", required=True, help="the model the page.json was probed on")
    rc.add_argument("--probe", required=True, help="page.json written by `domlora probe`")
    rc.add_argument("--replace", action="store_true", help="drop the earlier observations of this backbone")


def _hash(model: str) -> str:
    from pathlib import Path

    # the architecture hash needs only the config: build on the meta device, no weights loaded
    path = Path(resolve_model_path(model))
    if (path / "config.json").is_file():
        return config_hash(model_from_config(path / "config.json", device="meta"))
    return config_hash(load_model(model).model)


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    if a.action == "show":
        print(json.dumps(load_registry(a.registry), indent=2))
        return 0
    h = _hash(a.model)
    if a.action == "lookup":
        entry = lookup(a.model, h, path=a.registry, match_config=a.match_config)
        print(json.dumps(entry.to_dict() if entry else {"model": a.model, "config_hash": h, "registered": False}))
        return 0 if entry else 1
    if not Path(a.probe).is_file():
        raise ConfigError(f"probe file {a.probe} does not exist; fix: run `domlora probe` first")
    entry = record(read_json(a.probe), model=a.model, config_hash=h, path=a.registry, replace=a.replace)
    print(json.dumps({"key": entry.key, "dominant": entry.dominant, "stable": entry.stable,
                      "n_observations": len(entry.observations)}))
    return 0

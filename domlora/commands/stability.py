"""`domlora stability`: do probe sets of different tasks pick the same module on one backbone?"""
from __future__ import annotations

import argparse
import json

from domlora.errors import ConfigError
from domlora.io import read_json, write_json
from domlora.studies.stability import compare_probes

HELP = "compare page.json files of one backbone: dom / argmax agreement, Spearman, top-k overlap"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="append", required=True, metavar="[LABEL=]PAGE_JSON",
                   help="a page.json (repeat, at least twice); LABEL defaults to its folder name")
    p.add_argument("--k", type=int, default=5, help="top-k size")
    p.add_argument("--out", default=None, help="write the comparison JSON here")


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    docs = {}
    for item in a.probe:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"probe file {p} does not exist; fix: run `domlora probe` first")
        label = label or p.parent.name or p.stem
        if label in docs:
            raise ConfigError(f"two probes are labelled {label!r}; fix: name them LABEL=PATH")
        docs[label] = read_json(p)
    report = compare_probes(docs, k=a.k).to_dict()
    if a.out:
        write_json(a.out, report)
    print(json.dumps({k: report[k] for k in ("dom", "argmax", "dom_agreement", "argmax_agreement",
                                             "mean_spearman")}))
    return 0

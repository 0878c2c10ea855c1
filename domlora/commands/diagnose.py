"""`domlora diagnose`: massive activations per layer, super-weight candidates, forward-only `dom` prediction."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from domlora.commands._args import add_model, add_samples
from domlora.probes.activations import MassiveCriterion
from domlora.studies.diagnostics import diagnose

HELP = "forward-only activation diagnostics and the `massive` prediction of the dominant module"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_samples(p, data_help="chat JSONL; only the tokens are used (no labels)",
                samples_help="samples to run (the first N of --data)")
    p.add_argument("--out", required=True, help="output folder: activations.json, massive.json, activations.png")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument("--probe", default=None, help="page.json of the same model: plot its down_proj PAGE curve "
                                                 "and record agreement with its `dom`")
    p.add_argument("--rule", default="onset", choices=("onset", "largest_jump", "largest_output"),
                   help="which down_proj the predictor picks")
    p.add_argument("--abs-threshold", type=float, default=100.0, help="a massive value exceeds this |value|")
    p.add_argument("--ratio", type=float, default=1000.0, help="... and this many times the median |value|")
    add_model(p)


def run(a: argparse.Namespace) -> int:
    doc = diagnose(model=a.model, data=a.data, out_dir=a.out, samples=a.samples, max_length=a.max_length,
                   batch_size=a.batch_size, probe_path=a.probe, rule=a.rule,
                   criterion=MassiveCriterion(abs_threshold=a.abs_threshold, ratio=a.ratio), dtype=a.dtype,
                   device=a.device, trust_remote_code=a.trust_remote_code, show_progress=True)
    print(json.dumps({"predicted": doc["predicted"], "onset_layer": doc["onset_layer"],
                      "phenomenon": doc["phenomenon"], "agrees_with_dom": doc.get("agrees_with_dom"),
                      "seconds": round(doc["seconds"], 2), "out": str(Path(a.out) / "massive.json")}))
    return 0

"""`domlora checkpoints`: full fine-tuning that saves checkpoints, and PAGE across checkpoints (Figure 2)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from domlora.commands._args import MODEL_HELP, add_device, add_lora_shape, add_samples
from domlora.errors import ConfigError
from domlora.io import atomic_outputs, write_json
from domlora.studies.checkpoints import finetune_checkpoints, plot_checkpoint_curves, probe_checkpoints

HELP = "full fine-tuning checkpoints (`finetune`) and PAGE layer curves across them (`probe`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("finetune", help="full fine-tuning run saving the model at chosen steps")
    f.add_argument("--model", required=True, help=MODEL_HELP)
    f.add_argument("--data", required=True, help="chat JSONL training data")
    f.add_argument("--out", required=True, help="folder for step-NNNN/ checkpoints and checkpoints.json")
    f.add_argument("--steps", type=int, default=20, help="optimizer steps")
    f.add_argument("--save-steps", default="0,1,5,10,20", help="comma list of steps to save (0 = the base)")
    f.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (paper: 2e-5)")
    f.add_argument("--batch-size", type=int, default=4, help="samples per step")
    f.add_argument("--max-length", type=int, default=160, help="truncate samples to this many tokens")
    f.add_argument("--seed", type=int, default=0, help="data order seed")
    pr = sub.add_parser("probe", help="PAGE of every module on each checkpoint, plotted per type")
    pr.add_argument("--checkpoint", action="append", required=True,
                    help="a full checkpoint folder or an adapter folder (repeat, in order)")
    pr.add_argument("--base", default=None, help="base model for adapter folders (default: the adapter's own)")
    add_samples(pr)
    pr.add_argument("--out", required=True, help="output folder: checkpoints.json, checkpoints.png")
    add_lora_shape(pr)
    pr.add_argument("--batch-size", type=int, default=4, help="samples per forward/backward")
    add_device(pr)


def run(a: argparse.Namespace) -> int:
    if a.action == "finetune":
        try:
            save = tuple(int(x) for x in a.save_steps.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--save-steps must be a comma list of integers, got {a.save_steps!r}") from None
        man = finetune_checkpoints(model=a.model, train_data=a.data, out_dir=a.out, steps=a.steps, save_steps=save,
                                   lr=a.lr, batch_size=a.batch_size, max_length=a.max_length, seed=a.seed,
                                   show_progress=True)
        print(json.dumps({"checkpoints": [c["path"] for c in man["checkpoints"]], "loss_first_last":
                          [man["loss"][0], man["loss"][-1]] if man.get("loss") else None}))
        return 0
    doc = probe_checkpoints(a.checkpoint, data=a.data, samples=a.samples, max_length=a.max_length, alpha=a.alpha,
                            rank=a.rank, batch_size=a.batch_size, base=a.base, device=a.device, show_progress=True)
    with atomic_outputs(a.out) as stage:
        write_json(stage / "checkpoints.json", doc)
        plot_checkpoint_curves(doc, stage / "checkpoints.png")
    print(json.dumps({"dominants": doc["dominants"], "dominant_stable": doc["dominant_stable"],
                      "out": str(Path(a.out) / "checkpoints.json")}))
    return 0

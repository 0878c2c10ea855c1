"""`domlora train`: train an adapter at a placement (DomLoRA, vanilla LoRA, variants, IST, RST).

The recipe is one `TrainConfig`, built the way the pipeline builds it: the `train:` section of a
params.yaml profile (`--profile`), a method's overrides (`--method`), then flags (`--lr 1e-3`) and
`--set key=value` for any other field, all validated by the same schema. Without `--profile` the
defaults are the paper's recipe.

Run as: domlora train --model embedded --data data/arith/train.jsonl --placement placements/smol/arith/domlora.json \
            --out runs/mine --profile embedded --method domlora
"""
from __future__ import annotations

import argparse
import json

from domlora.commands._args import MODEL_HELP
from domlora.config import ModelSpec, close_matches, field_docs, from_dict
from domlora.errors import ConfigError
from domlora.pipeline.params import load_params
from domlora.train.config import TrainConfig
from domlora.train.loop import train

HELP = "train an adapter at a placement; writes OUT/adapter/ and OUT/train_metrics.json"

# flag -> TrainConfig field (the common ones; --set reaches every field)
FLAGS = {"--variant": ("variant", str), "--rank": ("rank", int), "--alpha": ("alpha", float),
         "--lr": ("lr", float), "--max-steps": ("max_steps", int), "--epochs": ("epochs", int),
         "--batch-size": ("batch_size", int), "--grad-accum": ("grad_accum", int),
         "--max-length": ("max_length", int), "--seed": ("seed", int), "--save-every": ("save_every", int),
         "--limit-samples": ("limit_samples", int), "--device": ("device", str), "--deepspeed": ("deepspeed", str),
         "--layer-sampling": ("layer_sampling", str)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    docs = field_docs(TrainConfig)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--dtype", default=None, help="the model's dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--data", required=True, help="training chat JSONL ({'messages': [...]} per line)")
    p.add_argument("--placement", default=None, help="placement JSON from `domlora select` (default: every "
                   "projection, i.e. vanilla LoRA)")
    p.add_argument("--out", required=True, help="output folder: adapter/, train_metrics.json, checkpoints/")
    p.add_argument("--params", default="params.yaml", help="params file read by --profile")
    p.add_argument("--profile", default=None, help="take the recipe from this profile's `train:` section (e.g. "
                   "embedded); default: the paper's recipe")
    p.add_argument("--method", default=None, help="apply this method's overrides from the profile (e.g. domlora)")
    for flag, (name, typ) in FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=docs.get(name, name))
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field (value parsed as YAML), e.g. --set lr_schedule=linear; repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared "
                   "machine: two threads contend badly there)")


def resolve_config(a: argparse.Namespace):
    """The TrainConfig the flags describe (profile `train:` < method overrides < flags < --set)."""
    import dataclasses

    import yaml

    base: dict = {}
    if a.profile is not None:
        params = load_params(a.params, profile=a.profile)
        if a.method is not None:
            if a.method not in params.methods:
                raise ConfigError(f"--method {a.method!r} is not a method of profile {a.profile!r}"
                                  f"{close_matches(a.method, params.methods)}; defined: {', '.join(params.methods)}")
            base = dataclasses.asdict(params.train_config(a.method))
        else:
            base = dataclasses.asdict(params.train)
    elif a.method is not None:
        raise ConfigError("--method reads a method of a params.yaml profile; fix: add --profile (e.g. embedded)")
    over = {name: getattr(a, flag.lstrip("-").replace("-", "_")) for flag, (name, _) in FLAGS.items()}
    over = {k: v for k, v in over.items() if v is not None}
    if a.no_gradient_checkpointing:
        over["gradient_checkpointing"] = False
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must be KEY=VALUE, e.g. --set lr_schedule=linear")
        over[key.strip()] = yaml.safe_load(value)
    return from_dict(TrainConfig, base | over, where="train")


def run(a: argparse.Namespace) -> int:
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    cfg = resolve_config(a)

    spec = from_dict(ModelSpec, {"id": a.model} | ({"dtype": a.dtype} if a.dtype else {}), where="model")
    doc = train(model=spec, train_data=a.data, placement=a.placement, out_dir=a.out, cfg=cfg, show_progress=True)
    loss = doc["loss"]
    print(json.dumps({"status": doc["status"], "steps": doc["completed_steps"],
                      "trainable_params": doc["trainable_params"], "loss_first": loss[0] if loss else None,
                      "loss_last": loss[-1] if loss else None, "train_time_s": doc["train_time_s"],
                      "out": str(a.out)}))
    return 0

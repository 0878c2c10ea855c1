"""`domlora train`: train an adapter at a placement (DomLoRA, vanilla LoRA, variants, IST, RST)."""
from __future__ import annotations

import argparse
import json

HELP = "train an adapter at a placement; writes OUT/adapter/ and OUT/train_metrics.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from domlora.adapters.variants import VARIANTS

    p.add_argument("--model", required=True, help="`embedded`, a hub id or a local checkpoint folder")
    p.add_argument("--data", required=True, help="training chat JSONL ({'messages': [...]} per line)")
    p.add_argument("--placement", default=None, help="placement JSON from `domlora select` (default: every "
                   "projection, i.e. vanilla LoRA)")
    p.add_argument("--out", required=True, help="output folder: adapter/, train_metrics.json, checkpoints/")
    p.add_argument("--variant", default=None, choices=VARIANTS, help="adapter variant (default lora)")
    p.add_argument("--method", default=None, choices=["ist", "rst"],
                   help="training-time layer sampling: ist (by learnt importance) or rst (uniform)")
    p.add_argument("--profile", default="paper", choices=["paper", "embedded"],
                   help="defaults: the paper's recipe, or the small-CPU embedded one (placements of <= 4 "
                   "modules get its single-adapter learning rate)")
    for flag, typ, what in (("--rank", int, "LoRA rank"), ("--alpha", float, "LoRA alpha"),
                            ("--lr", float, "peak learning rate"), ("--max-steps", int, "optimizer steps"),
                            ("--epochs", int, "epochs (when --max-steps is not set)"),
                            ("--batch-size", int, "samples per micro-batch"),
                            ("--grad-accum", int, "micro-batches per optimizer step"),
                            ("--max-length", int, "tokens per sample"), ("--seed", int, "seed"),
                            ("--save-every", int, "steps between checkpoints (0 = none)"),
                            ("--limit-samples", int, "use the first N samples")):
        p.add_argument(flag, type=typ, default=None, help=what)
    p.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config (configs/deepspeed_zero2.json)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared "
                   "machine: two threads contend badly there)")


def run(a: argparse.Namespace) -> int:
    from domlora.errors import ConfigError
    from domlora.train import TrainConfig, embedded_config, train

    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)

    over = {k: v for k, v in {
        "variant": a.variant, "rank": a.rank, "alpha": a.alpha, "lr": a.lr, "max_steps": a.max_steps,
        "epochs": a.epochs, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "max_length": a.max_length,
        "seed": a.seed, "save_every": a.save_every, "limit_samples": a.limit_samples, "dtype": a.dtype,
        "device": a.device, "deepspeed": a.deepspeed}.items() if v is not None}
    if a.no_gradient_checkpointing:
        over["gradient_checkpointing"] = False
    if a.profile == "embedded":
        # one module (or a handful, as in the paper's ablations) trains with the single-adapter rate
        n = None
        if a.placement is not None:
            from domlora.io import read_json

            try:
                n = len(read_json(a.placement).get("modules", []))
            except (OSError, ValueError, AttributeError):
                n = None  # train() reports the bad placement file
        cfg = embedded_config(dom=n is not None and n <= 4, **over)
    else:
        cfg = TrainConfig(**over)
    doc = train(model=a.model, train_data=a.data, placement=a.placement, out_dir=a.out, cfg=cfg,
                method=a.method, show_progress=True)
    loss = doc["loss"]
    print(json.dumps({"status": doc["status"], "steps": doc["completed_steps"],
                      "trainable_params": doc["trainable_params"], "loss_first": loss[0] if loss else None,
                      "loss_last": loss[-1] if loss else None, "train_time_s": doc["train_time_s"],
                      "out": str(a.out)}))
    return 0

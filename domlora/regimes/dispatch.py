"""The training regimes by name (`REGIMES`) and the one a method trains with (`regime_of`)."""
from __future__ import annotations

from domlora.regimes.grpo import grpo
from domlora.regimes.sparse_b import sparse_b_sft
from domlora.train.loop import train


def _sft(*, model, train_data, eval_data, placement, out_dir, cfg, method, show_progress: bool = False) -> dict:
    return train(model=model, train_data=train_data, placement=placement, out_dir=out_dir, cfg=cfg,
                 show_progress=show_progress)


def _sparse_b(*, model, train_data, eval_data, placement, out_dir, cfg, method, show_progress: bool = False) -> dict:
    return sparse_b_sft(model=model, train_data=train_data, placement=placement, out_dir=out_dir, cfg=cfg,
                        spec=method.sparse_b, show_progress=show_progress)


def _grpo(*, model, train_data, eval_data, placement, out_dir, cfg, method, show_progress: bool = False) -> dict:
    return grpo(model=model, train_data=train_data, eval_data=eval_data, placement=placement, out_dir=out_dir,
                cfg=cfg, settings=method.grpo, sparse_b=method.sparse_b, show_progress=show_progress)


REGIMES = {"sft": _sft, "sparse_b": _sparse_b, "grpo": _grpo}
"""name -> `fn(*, model, train_data, eval_data, placement, out_dir, cfg, method, show_progress)`"""


def regime_of(method) -> str:
    """The regime a method (`pipeline.params.MethodSpec`) trains with: GRPO with a `grpo:` section (its
    `sparse_b:` then budgets GRPO's entries of B), sparse-B SFT with only `sparse_b:`, plain SFT otherwise."""
    if method.grpo is not None:
        return "grpo"
    return "sparse_b" if method.sparse_b is not None else "sft"

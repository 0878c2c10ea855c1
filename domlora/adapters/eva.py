"""EVA's pieces shared by the EVA placement peer (`domlora.peers.eva`) and EVA initialisation
(`adapters.variants.init_eva`): its dataloader, its checks, and a forward pass bounded in passes."""
from __future__ import annotations

import contextlib
import logging

from domlora.errors import ConfigError
from domlora.samples import collate

logger = logging.getLogger(__name__)


def eva_batches(encoded, *, batch_size: int, pad_id: int, device=None) -> list[dict]:
    """EVA's dataloader: batches in file order with `labels` = the target tokens (-100 elsewhere), so PEFT's
    label mask keeps the SVD on assistant tokens as the training loss does."""
    out = []
    for k in range(0, len(encoded), batch_size):
        b = collate(encoded[k:k + batch_size], pad_id=pad_id, device=device)
        target = (b["loss_mask"] * b["attention_mask"]).bool()
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                    "labels": b["input_ids"].masked_fill(~target, -100)})
    return out


def check_eva(batches: list[dict], *, rank: int, rho: float, min_d_in: int) -> None:
    """EVA's SVD keeps rho x rank components per module: each batch needs that many target tokens, and every
    module that many input features."""
    need = round(rank * rho)
    if need > min_d_in:
        raise ConfigError(f"EVA keeps rho x rank = {need} components, more than the {min_d_in} input features of "
                          "the smallest placed module; fix: a smaller rank or eva_rho")
    short = min(int((b["labels"] != -100).sum()) for b in batches) if batches else 0
    if short < need:
        raise ConfigError(f"EVA's SVD needs at least rho x rank = {need} target tokens per batch, and a batch here "
                          f"holds {short}; fix: raise eva_batch_size (or eva_samples)")


def eva_forward(model, inputs: dict):
    """EVA's forward pass: the projections' inputs are what it reads, so no logits and no loss are computed."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                 logits_to_keep=1)


EVA_MAX_PASSES = 12
"""PEFT's EVA cycles over its batches until every module's components have converged (cosine >= tau), with no
bound of its own: after this many passes over the samples it is stopped with an error that says what to change"""


def bounded_eva_forward(n_batches: int, *, tau: float, max_passes: int = EVA_MAX_PASSES):
    """`eva_forward` that refuses to run past `max_passes` passes over the `n_batches` batches."""
    calls = [0]

    def forward(model, inputs):
        calls[0] += 1
        if calls[0] > max_passes * n_batches:
            raise ConfigError(f"EVA's SVD has not converged (tau {tau}) after {max_passes} passes over its "
                              f"{n_batches} batch(es); fix: more samples (eva_samples), larger batches "
                              "(eva_batch_size), or a lower eva_tau")
        if calls[0] % n_batches == 0:
            logger.info("EVA: pass %d over the samples", calls[0] // n_batches)
        return eva_forward(model, inputs)

    return forward


@contextlib.contextmanager
def quiet_eva():
    # note: PEFT prints (not logs) a line per skipped SVD step; the token check above makes those rare
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield

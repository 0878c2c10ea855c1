"""Every step-0 signal from one pass: PAGE, PLoP's NFN and the activation statistics.

PAGE needs a forward pass and an activation-only backward; NFN and the activation statistics
(massive activations, super-weight candidates: what the `massive` predictor and `domlora
diagnose` read) need only what the forward pass's hooks see. `step0_probe` attaches all three
collectors and runs the probe batches once, so the extra signals cost their hooks, not passes.
Each result equals what `page_probe`, `nfn_probe` and `activation_diagnostics` give on their own.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.modules import Candidate, find_candidates
from domlora.probes.activations import (
    ActivationCollector,
    ActivationReport,
    MassiveCriterion,
    ffn_down_candidates,
)
from domlora.probes.nfn import NFNCollector, NFNResult
from domlora.probes.page import PageCollector, PageResult, check_lora_shape
from domlora.probes.runner import PassStats, run_pass
from domlora.samples import Encoded

logger = logging.getLogger(__name__)


@dataclass
class Step0Result:
    """What one pass over the probe set measured; a signal that was not asked for is None."""

    page: PageResult | None
    """PAGE / S per module (`page_probe`'s result)"""
    nfn: NFNResult | None
    """NFN per module and type (`nfn_probe`'s result)"""
    activations: ActivationReport | None
    """massive activations and super-weight candidates (`activation_diagnostics`' report)"""
    stats: PassStats
    """time, batch size, batches, real and padded tokens of the pass"""


def step0_probe(model, encoded: Sequence[Encoded], *, page: bool = True, nfn: bool = True,
                activations: bool = True, alpha: float = 16.0, rank: int = 8, batch_size: int = 1,
                candidates: Sequence[Candidate] | None = None, nfn_seed: int = 0,
                criterion: MassiveCriterion | None = None, show_progress: bool = False) -> Step0Result:
    """Compute the chosen step-0 signals in one pass over the probe set.

    Args:
        model: a causal LM; only hooks are attached (and removed), its weights stay frozen and untouched.
        encoded: tokenised probe samples (`samples.encode_samples`).
        page, nfn, activations: which signals to compute. Without `page` the pass is forward only.
        alpha, rank: the LoRA shape PAGE is computed for.
        batch_size: samples per forward/backward (none of the results depend on it).
        candidates: modules PAGE and NFN score (default: every candidate projection); the activation
            statistics always cover every block.
        nfn_seed: seeds NFN's Gaussian baseline vectors.
        criterion: what counts as a massive activation.

    Raises:
        ConfigError: nothing asked for, an empty probe set, alpha/rank <= 0, a bad batch size.
        ModelError: `activations` on a model without a recognisable FFN down projection.
    """
    if not (page or nfn or activations):
        raise ConfigError("no signal asked for; fix: keep at least one of page, nfn, activations")
    if page:
        check_lora_shape(alpha, rank)
    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample with an assistant turn")
    cands = list(candidates) if candidates is not None else find_candidates(model)
    cols: dict = {}
    if page:
        cols["page"] = PageCollector(cands, len(encoded))
    if nfn:
        cols["nfn"] = NFNCollector(cands, seed=nfn_seed)
    if activations:
        all_cands, downs = ffn_down_candidates(model)
        cols["activations"] = ActivationCollector(all_cands, downs, len(encoded), criterion=criterion)
    stats = run_pass(model, encoded, list(cols.values()), batch_size=batch_size, show_progress=show_progress,
                     desc="step-0 probe (" + ", ".join(cols) + ")")
    logger.info("one pass over %d samples (%s): %.1f s, batch size %d, %d batches, %d tokens (%d with padding)",
                len(encoded), ", ".join(cols), stats.seconds, stats.batch_size, stats.n_batches, stats.n_tokens,
                stats.n_padded)
    return Step0Result(
        page=cols["page"].result(alpha=alpha, rank=rank, seconds=stats.seconds) if page else None,
        nfn=cols["nfn"].result(seconds=stats.seconds) if nfn else None,
        activations=cols["activations"].result(seconds=stats.seconds) if activations else None,
        stats=stats)

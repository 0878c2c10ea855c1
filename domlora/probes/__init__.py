"""Probes that score candidate modules: PAGE (gradients, step 0), NFN (PLoP, forward only) and the
activation statistics, each alone or all from one pass (`step0_probe`)."""
from __future__ import annotations

from domlora.probes.nfn import NFNResult, nfn_probe, nfn_reference_probe
from domlora.probes.page import PageResult, page_closed_form, page_probe
from domlora.probes.step0 import Step0Result, step0_probe

__all__ = ["PageResult", "page_probe", "page_closed_form", "NFNResult", "nfn_probe", "nfn_reference_probe", "Step0Result", "step0_probe"]

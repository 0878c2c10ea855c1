"""Probes that score candidate modules: PAGE (gradients, step 0) and NFN (PLoP, forward only)."""
from __future__ import annotations

from domlora.probes.nfn import NFNResult, nfn_probe
from domlora.probes.page import PageResult, page_closed_form, page_probe

__all__ = ["PageResult", "page_probe", "page_closed_form", "NFNResult", "nfn_probe"]

"""Probes that score candidate modules: PAGE (gradients, step 0), NFN (PLoP, forward only) and the
activation statistics, each alone or all from one pass (`step0_probe`).

Import from the probe's module (`probes.page`, `probes.nfn`, `probes.step0`); the names below are
re-exported lazily so that importing one probe does not load the others.
"""
from __future__ import annotations

__all__ = ["PageResult", "page_probe", "page_closed_form", "NFNResult", "nfn_probe", "Step0Result", "step0_probe"]

_EXPORTS = {"PageResult": "page", "page_probe": "page", "page_closed_form": "page", "NFNResult": "nfn",
            "nfn_probe": "nfn", "Step0Result": "step0", "step0_probe": "step0"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Task stability of PAGE: do probe sets of different tasks pick the same module on one backbone?

`compare_probes` and `bootstrap_choice` live in `probes.agreement` (the report and the probe stage use them
too); this module keeps their study-side names. `compare_probes` compares `page.json` documents of one
backbone pairwise: agreement of the overall argmax and of the `dom` module (largest-PAGE `down_proj`),
Spearman correlation of the module PAGE vectors, and top-k overlap. `bootstrap_choice` resamples the probe
samples of one run (from `PageResult.per_sample`, no re-probing) and reports how often `dom` and the argmax
stay what the full probe set picks.
"""
from __future__ import annotations

from domlora.probes.agreement import (BootstrapResult, PairComparison, StabilityReport,  # noqa: F401
                                      bootstrap_choice, compare_probes, spearman)

"""One function per pipeline stage, with path-level I/O; DVC stages and Prefect flows call these.

Each function reads only its declared inputs, validates them before any heavy work,
and replaces its outputs atomically (a failure leaves the previous outputs intact).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigError
from .io import atomic_outputs, read_json, write_json

logger = logging.getLogger(__name__)


def probe(*, model: str, data: str | os.PathLike, out_dir: str | os.PathLike, samples: int = 32,
          max_length: int = 256, alpha: float = 16.0, rank: int = 8, batch_size: int = 4, dtype: str = "auto",
          device: str | None = None, nfn: bool = True, trust_remote_code: bool = False,
          cache_dir: str | None = None, show_progress: bool = False, model_name: str | None = None) -> dict:
    """Probe stage: write `page.json`, `page.png` and (with `nfn`) `nfn.json` into `out_dir`."""
    from .models import load_model
    from .probes import nfn_probe, page_probe
    from .probes.page import check_lora_shape
    from .samples import encode_samples, read_samples
    from .summary import nfn_summary, page_summary, plot_page_heatmap

    check_lora_shape(alpha, rank)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    chosen = read_samples(data, limit=samples)  # validate before loading the model
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    encoded, report = encode_samples(loaded.tokenizer, chosen, max_length=max_length)
    if len(chosen) < samples:
        logger.warning("asked for %d probe samples, %s holds %d", samples, data, len(chosen))
    result = page_probe(loaded.model, encoded, alpha=alpha, rank=rank, batch_size=batch_size,
                        show_progress=show_progress)
    result.encode_report = report
    name = model_name or model
    doc = page_summary(result, model=name)
    doc["data"] = str(data)
    doc["max_length"] = max_length
    with atomic_outputs(out_dir) as stage:
        write_json(stage / "page.json", doc)
        plot_page_heatmap(doc, stage / "page.png")
        if nfn:
            n = nfn_probe(loaded.model, encoded, batch_size=max(batch_size, 8), show_progress=show_progress)
            write_json(stage / "nfn.json", nfn_summary(n, model=name))
    logger.info("dominant module %s (%.1f%% of all PAGE); argmax %s", doc["dominant"],
                100 * doc.get("dominant_share_total", float("nan")), doc["argmax"])
    return doc


def select_placement(*, probe_path: str | os.PathLike, strategy: str, out: str | os.PathLike,
                     nfn_path: str | os.PathLike | None = None, k: int = 3, types: tuple[str, ...] = (),
                     layers: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Select stage: write a placement JSON (module names + evidence) from probe outputs."""
    from .placement import PlacementSpec, select

    spec = PlacementSpec(strategy=strategy, k=k, types=tuple(types), layers=tuple(layers), seed=seed)
    probe_path = Path(probe_path)
    if not probe_path.is_file():
        raise ConfigError(f"probe file {probe_path} does not exist; fix: run `domlora probe` first")
    page = read_json(probe_path)
    nfn_file = Path(nfn_path) if nfn_path else probe_path.with_name("nfn.json")
    nfn = read_json(nfn_file) if nfn_file.is_file() else None
    placement = select(spec, probe=page, nfn=nfn)
    doc = placement.to_dict() | {"probe": str(probe_path)}
    write_json(out, doc)
    return doc

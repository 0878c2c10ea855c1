"""prepare_data stage: a dataset's train, probe and eval splits."""
from __future__ import annotations

import logging
from pathlib import Path

from domlora import rehearsal
from domlora.data import prepare_dataset

logger = logging.getLogger(__name__)


def prepare_data_stage(params, dataset: str, *, layout, show_progress: bool = False) -> dict:
    """prepare_data: data/<dataset>/{train,probe,eval}.jsonl + stats.json."""
    spec = params.datasets[dataset]
    kw = dict(n_train=spec.n_train, n_probe=spec.n_probe, n_eval=spec.n_eval, seed=params.seed_data,
              show_progress=show_progress)
    if not spec.stand_in:
        return prepare_dataset(spec.source, layout.data_dir(dataset), source=spec.path, **kw)
    import tempfile

    # rows in the hub dataset's own schema, read through the same loader as the real data
    with tempfile.TemporaryDirectory(prefix="domlora-stand-in-") as tmp:
        src = rehearsal.write_training_data(spec.source, Path(tmp) / f"{spec.source}.jsonl", seed=params.seed_data,
                                            n=spec.n_train + spec.n_probe + spec.n_eval)
        return prepare_dataset(spec.source, layout.data_dir(dataset), source=str(src), **kw,
                               source_label=f"stand-in rows in the {rehearsal.SCHEMA_OF[spec.source]} schema")



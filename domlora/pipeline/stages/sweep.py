"""sweep stage: one method of a budget class trained at one candidate learning rate, scored by its NLL on
the validation split (`pipeline.tune` plans the sweeps and chooses each class's rate from them)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from domlora.adapters.variants import load_for_eval
from domlora.errors import ConfigError
from domlora.evaluate.nll import heldout_nll
from domlora.io import read_json, write_json
from domlora.pipeline.tune import Sweep, check_sweep, sweep_config
from domlora.samples import read_samples
from domlora.train.config import TrainingDiverged
from domlora.train.loop import train

logger = logging.getLogger(__name__)


def validation_samples(params, train_path: str | Path, dataset: str) -> list[dict]:
    """The validation split: the last `tune.val_samples` samples of the training split."""
    rows = read_samples(train_path)
    n_train = params.tuned_samples(dataset)
    if len(rows) != params.datasets[dataset].n_train:
        raise ConfigError(f"{train_path} holds {len(rows)} samples, the profile says n_train = "
                          f"{params.datasets[dataset].n_train}; fix: rerun prepare_data")
    return rows[n_train:]


def sweep_stage(params, run_id: str, *, layout, show_progress: bool = False) -> dict:
    """sweep: placements/<model>/<dataset>/tuning/<budget>/<method>-lr<i>.json (validation NLL + loss curve)."""
    s = Sweep.parse(run_id)
    check_sweep(params, s)
    m = params.methods[s.method]
    lr = params.tune.budgets[m.budget].lrs[s.index]
    spec = params.models[s.model]
    cfg = sweep_config(params, s.method, s.dataset, lr)
    data = layout.split(s.dataset, "train")
    val = validation_samples(params, data, s.dataset)
    out = layout.sweep_json(s.model, s.dataset, m.budget, s.method, s.index)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"sweep": s.id, "model": s.model, "dataset": s.dataset, "method": s.method, "budget": m.budget,
           "lr": float(lr), "seed": cfg.seed, "train_samples": cfg.limit_samples, "val_samples": len(val)}
    batch = params.eval.batch_size if isinstance(params.eval.batch_size, int) else 8
    with tempfile.TemporaryDirectory(prefix=f"domlora-sweep-{s.id}-") as tmp:
        try:
            rec = train(model=spec, train_data=data, placement=layout.placement(s.model, s.dataset, s.method),
                        out_dir=tmp, cfg=cfg, show_progress=show_progress)
        except TrainingDiverged as exc:
            logger.warning("sweep %s diverged: %s", s.id, exc)
            rec = read_json(Path(tmp) / "train_metrics.json")
            doc |= {"status": "diverged", "error": str(exc), "val_nll": None}
        else:
            loaded = load_for_eval(spec, Path(tmp) / "adapter")
            nll = heldout_nll(loaded.model, loaded.tokenizer, val, batch_size=batch)
            doc |= {"status": "success", "val_nll": nll["nll"], "val": nll}
        doc |= {"loss": rec.get("loss", []), "steps": rec.get("steps"), "trainable_params": rec.get("trainable_params"),
                "train_time_s": rec.get("train_time_s"), "wall_time_s": rec.get("wall_time_s")}
    write_json(out, doc)
    return doc

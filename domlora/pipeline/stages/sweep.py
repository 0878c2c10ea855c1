"""sweep stage: one method of a tier trained at one rate of its grid, scored by its NLL on the validation split
(`pipeline.tune` plans the sweeps; the tune stage chooses each method's rate from them and runs the extensions
through `tuning_run`)."""
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
    out = layout.sweep_json(s.model, s.dataset, m.budget, s.method, s.index)
    doc = {"sweep": s.id} | tuning_run(params, s.model, s.dataset, s.method, lr, layout=layout,
                                       show_progress=show_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, doc)
    return doc


def tuning_run(params, model: str, dataset: str, method: str, lr: float, *, layout, steps: int | None = None,
               show_progress: bool = False) -> dict:
    """Train a method at `lr` on the tuning seed and the carved training split; score the validation split."""
    m = params.methods[method]
    spec = params.models[model]
    cfg = sweep_config(params, method, dataset, lr)
    if steps is not None:
        cfg = cfg.replace(max_steps=int(steps))
    data = layout.split(dataset, "train")
    val = validation_samples(params, data, dataset)
    doc = {"model": model, "dataset": dataset, "method": method, "budget": m.budget, "lr": float(lr),
           "seed": cfg.seed, "max_steps": cfg.max_steps, "train_samples": cfg.limit_samples, "val_samples": len(val)}
    batch = params.eval.batch_size if isinstance(params.eval.batch_size, int) else 8
    with tempfile.TemporaryDirectory(prefix=f"domlora-sweep-{model}-{method}-") as tmp:
        try:
            rec = train(model=spec, train_data=data, placement=layout.placement(model, dataset, method),
                        out_dir=tmp, cfg=cfg, show_progress=show_progress)
        except TrainingDiverged as exc:
            logger.warning("tuning run %s/%s/%s at lr %g diverged: %s", model, dataset, method, lr, exc)
            rec = read_json(Path(tmp) / "train_metrics.json")
            doc |= {"status": "diverged", "error": str(exc), "val_nll": None}
        else:
            loaded = load_for_eval(spec, Path(tmp) / "adapter")
            nll = heldout_nll(loaded.model, loaded.tokenizer, val, batch_size=batch)
            doc |= {"status": "success", "val_nll": nll["nll"], "val": nll}
        doc |= {"loss": rec.get("loss", []), "steps": rec.get("steps"), "trainable_params": rec.get("trainable_params"),
                "train_time_s": rec.get("train_time_s"), "wall_time_s": rec.get("wall_time_s")}
    return doc

"""train stage: one grid cell's adapter, in the regime its method names."""
from __future__ import annotations

from domlora.io import read_json, write_text
from domlora.pipeline.launch import is_main_process
from domlora.pipeline.tracking import NullTracker
from domlora.pipeline.tune import cell_overrides
from domlora.regimes.dispatch import REGIMES, regime_of
from domlora.train.config import TrainRecord


def train_stage(params, cell, *, layout, tracker=None, show_progress: bool = False) -> dict:
    """train: runs/<cell>/adapter/, train_metrics.json (the run's `TrainRecord`), loss.csv.

    One resolved `TrainConfig` (the profile's `train:` + the method's overrides + the cell's seed) drives
    every regime (`regimes.dispatch.REGIMES`): plain SFT, sparse-B SFT and GRPO (the method's `sparse_b:` /
    `grpo:` sections name it).
    """
    tracker = tracker or NullTracker()
    m = params.methods[cell.method]
    spec = params.models[cell.model]
    cfg = params.train_config(cell.method, seed=cell.seed)
    tuned = cell_overrides(params, cell, layout=layout)  # a budget class's chosen lr and training samples
    if tuned:
        cfg = cfg.replace(**tuned)
    out_dir = layout.run_dir(cell)
    placement = layout.placement(cell.model, cell.dataset, cell.method)
    data = layout.split(cell.dataset, "train")
    run = REGIMES[regime_of(m)]
    try:
        run(model=spec, train_data=data, eval_data=layout.split(cell.dataset, "eval"), placement=placement,
            out_dir=out_dir, cfg=cfg, method=m, show_progress=show_progress)
    except Exception as exc:
        if is_main_process():
            tracker.mark_failed(cell=cell, error=f"{type(exc).__name__}: {exc}")
        raise
    if is_main_process():  # one of several launched processes: the first writes what the others share
        write_loss_csv(layout.train_metrics(cell), layout.loss_csv(cell))
        tracker.log_cell(cell=cell, params=params, layout=layout, stage="train")
    return read_json(layout.train_metrics(cell))


def write_loss_csv(record_path, csv_path) -> None:
    """The loss curve of a `TrainRecord` (and GRPO's reward) as `step,loss[,reward]` rows for DVC plots."""
    rec = TrainRecord.read(record_path)
    cols = ["loss"] + (["reward"] if rec.reward else [])
    rows = [",".join(["step"] + cols)]
    for i in range(max(len(rec.loss), len(rec.reward))):
        vals = [rec.loss[i] if i < len(rec.loss) else None, rec.reward[i] if i < len(rec.reward) else None]
        rows.append(",".join([str(i + 1)] + ["" if v is None or v != v else f"{v:.6g}" for v in vals[:len(cols)]]))
    write_text(csv_path, "\n".join(rows) + "\n")



"""evaluate stage: lm-eval tasks and MT-Bench on a cell's adapter, or on the base model."""
from __future__ import annotations

import logging

from domlora.evaluate.run import evaluate
from domlora.evaluate.stand_in import stand_in_judge, write_stand_in_data
from domlora.io import write_json

logger = logging.getLogger(__name__)


def evaluate_stage(params, cell_or_base, *, layout, model: str | None = None, dataset: str | None = None,
                   tracker=None, show_progress: bool = False) -> dict:
    """evaluate: runs/<cell>/eval.json + scores.json (a cell), or runs/<model>-<dataset>-base/ (no adapter)."""
    if cell_or_base == "base":
        run_id, adapter = layout.base_id(model, dataset), None
    else:
        cell = cell_or_base
        model, dataset, run_id, adapter = cell.model, cell.dataset, cell.id, layout.adapter(cell)
    spec, e = params.models[model], params.eval
    kw = dict(model=spec, adapter=adapter, tasks=list(params.datasets[dataset].tasks), out=layout.eval_json(run_id),
              data_dir=layout.data_root, limit=e.limit, batch_size=e.batch_size, max_gen_toks=e.max_gen_toks,
              allow_code_exec=e.allow_code_exec, show_progress=show_progress)
    if e.stand_in:
        doc = _evaluate_on_stand_ins(evaluate, kw)
    else:
        doc = evaluate(**kw)
    flat = doc.get("metrics", {})
    write_json(layout.scores_json(run_id), flat)
    if tracker is not None and cell_or_base != "base":
        tracker.log_cell(cell=cell_or_base, params=params, layout=layout, stage="evaluate")
    return doc


def _evaluate_on_stand_ins(evaluate, kw: dict) -> dict:
    """The same tasks on stand-in rows in each benchmark's schema, MT-Bench graded by a loopback judge."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="domlora-stand-in-eval-") as tmp, stand_in_judge() as judge:
        write_stand_in_data(tmp)
        return evaluate(**kw, stand_in_data=tmp, judge=judge.config)



"""MLflow tracking: one parent run per grid execution, one child run per cell.

The active-run stack of MLflow is per thread and per process, so nothing here relies on
`mlflow.start_run(nested=True)`: runs are created and found through `MlflowClient` by tags
(`domlora.grid_id`, `domlora.cell_id`) and children carry an explicit `mlflow.parentRunId`.
Everything logged is read back from the files the stages wrote, so a tracking failure
loses nothing: the cell is marked pending and `domlora sync` logs it later.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PENDING = ".tracking_pending"
SECRET_WORDS = ("key", "token", "secret", "password")


def grid_id_for(profile: str, params_hash: str) -> str:
    """A grid execution's id: $DOMLORA_GRID_ID (set by the Prefect flow), else profile + params hash."""
    return os.environ.get("DOMLORA_GRID_ID") or f"{profile}-{params_hash}"


def _scrub(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(w in k.lower() for w in SECRET_WORDS)}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


class NullTracker:
    """Tracking off: every call is a no-op."""

    enabled = False

    def log_cell(self, *a, **k) -> None: ...
    def log_probe(self, *a, **k) -> None: ...
    def log_tables(self, *a, **k) -> None: ...
    def finish_grid(self, *a, **k) -> None: ...
    def mark_failed(self, *a, **k) -> None: ...


class MlflowTracker:
    """Logs cells of one grid execution into an MLflow store (default: a local SQLite file)."""

    enabled = True

    def __init__(self, *, uri: str, experiment: str, grid_id: str, profile: str, params_hash: str):
        self.uri, self.experiment, self.grid_id = uri, experiment, grid_id
        self.profile, self.params_hash = profile, params_hash
        self._client = None
        self._exp_id = None
        self._parent = None

    # -- plumbing
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._exp_id = self._client.create_experiment(self.experiment)
                except Exception:  # created meanwhile by a parallel cell
                    self._exp_id = self._client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._exp_id = exp.experiment_id
        return self._client

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self._exp_id], filter_string=filter_string, max_results=5,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def parent_run_id(self) -> str:
        if self._parent is None:
            run = self._find(f"tags.`domlora.grid_id` = '{self.grid_id}' and tags.`domlora.kind` = 'grid'")
            if run is None:
                from domlora.provenance import git_commit

                run = self.client.create_run(self._exp_id, run_name=f"grid-{self.grid_id}", tags={
                    "domlora.grid_id": self.grid_id, "domlora.kind": "grid", "domlora.profile": self.profile,
                    "params_md5": self.params_hash, "git_commit": git_commit() or "unknown"})
            self._parent = run.info.run_id
        return self._parent

    def cell_run_id(self, cell_id: str, tags: dict | None = None) -> str:
        parent = self.parent_run_id()
        run = self._find(f"tags.`domlora.cell_id` = '{cell_id}' and tags.`mlflow.parentRunId` = '{parent}'")
        if run is None:
            run = self.client.create_run(self._exp_id, run_name=cell_id, tags={
                "mlflow.parentRunId": parent, "domlora.cell_id": cell_id, "domlora.grid_id": self.grid_id,
                "domlora.kind": "cell", **(tags or {})})
        return run.info.run_id

    def _safe(self, what: str, fn, *, pending_dir: Path | None = None):
        try:
            fn()
            if pending_dir is not None:
                (pending_dir / PENDING).unlink(missing_ok=True)
        except Exception as exc:  # tracking must never lose results
            logger.warning("MLflow %s failed (%s); results stay on disk, run `domlora sync` later", what,
                           str(exc).splitlines()[0][:200])
            if pending_dir is not None and pending_dir.is_dir():
                (pending_dir / PENDING).write_text(json.dumps({"grid_id": self.grid_id, "error": str(exc)[:500]}))

    # -- what stages call
    def log_cell(self, *, cell, params, layout, stage: str) -> None:
        """Log a cell's params, metrics and artefacts from the files its stages wrote."""
        run_dir = layout.run_dir(cell)
        self._safe(f"logging of {cell.id}", lambda: self._log_cell(cell, params, layout, stage), pending_dir=run_dir)

    def mark_failed(self, *, cell, error: str) -> None:
        def go():
            rid = self.cell_run_id(cell.id)
            self.client.set_tag(rid, "domlora.status", "failed")
            self.client.set_tag(rid, "domlora.error", error[:4000])
            self.client.set_terminated(rid, status="FAILED")
        self._safe(f"failure note of {cell.id}", go)

    def _log_cell(self, cell, params, layout, stage: str) -> None:
        from mlflow.entities import Metric, Param

        m = params.methods[cell.method]
        tcfg = params.method_train(cell.method)
        tags = {"model": cell.model, "dataset": cell.dataset, "method": cell.method, "seed": str(cell.seed),
                "variant": tcfg.variant, "placement": m.placement, "paper_tables": ",".join(map(str, m.tables)),
                "dvc_stage": f"train@{cell.id}"}
        rid = self.cell_run_id(cell.id, tags)
        for k, v in tags.items():
            self.client.set_tag(rid, f"domlora.{k}" if k in ("model", "dataset", "method") else k, v)
        placement_path = layout.placement(cell.model, cell.dataset, cell.method)
        placement = json.loads(placement_path.read_text()) if placement_path.is_file() else {}
        p = {"model": params.models[cell.model].id, "dataset": cell.dataset, "method": cell.method,
             "variant": tcfg.variant, "r": tcfg.rank, "alpha": tcfg.alpha, "lr": tcfg.lr, "seed": cell.seed,
             "placement": m.placement, "ist": m.ist, "max_steps": tcfg.max_steps,
             "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum, "max_length": tcfg.max_length,
             "n_target_modules": len(placement.get("modules", [])),
             "target_modules": ",".join(placement.get("modules", []))[:6000]}
        metrics: list = []
        tm_path = layout.train_metrics(cell)
        ts = 0
        if tm_path.is_file():
            tm = json.loads(tm_path.read_text())
            for key in ("trainable_params", "total_params"):
                if key in tm:
                    p[key] = tm[key]
            for step, loss in _loss_points(tm):
                metrics.append(Metric("train/loss", float(loss), ts, int(step)))
            for key, value in train_summary(tm).items():
                if isinstance(value, (int, float)):
                    metrics.append(Metric(f"train/{key}", float(value), ts, 0))
            self.client.set_tag(rid, "domlora.train_status", str(tm.get("status", "unknown")))
        ev_path = layout.scores_json(cell)
        if ev_path.is_file():
            for k, v in json.loads(ev_path.read_text()).items():
                if isinstance(v, (int, float)):
                    metrics.append(Metric(f"eval/{k}".replace("@", "_at_"), float(v), ts, 0))
        params_list = [Param(k, str(v)[:6000]) for k, v in _scrub(p).items()]
        existing = self.client.get_run(rid).data.params
        params_list = [x for x in params_list if x.key not in existing]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(rid, metrics=metrics[i:i + 900])
        if params_list:
            self.client.log_batch(rid, params=params_list)
        for f in (placement_path, tm_path, layout.eval_json(cell), layout.page_json(cell.model, cell.dataset),
                  layout.probe_dir(cell.model, cell.dataset) / "page.png"):
            if Path(f).is_file():
                self.client.log_artifact(rid, str(f))
        adapter = layout.adapter(cell)
        if stage == "train" and adapter.is_dir():
            self.client.log_artifacts(rid, str(adapter), artifact_path="adapter")
        self.client.set_tag(rid, "domlora.status", "success")
        if ev_path.is_file():  # trained and evaluated: the cell is complete
            self.client.set_terminated(rid, status="FINISHED")

    def log_probe(self, *, model: str, dataset: str, layout) -> None:
        def go():
            parent = self.parent_run_id()
            d = layout.probe_dir(model, dataset)
            doc = json.loads((d / "page.json").read_text())
            for key in ("dominant", "argmax"):
                self.client.set_tag(parent, f"probe.{model}.{dataset}.{key}", str(doc.get(key)))
            for f in ("page.json", "page.png", "nfn.json"):
                if (d / f).is_file():
                    self.client.log_artifact(parent, str(d / f), artifact_path=f"probes/{model}/{dataset}")
        self._safe(f"probe logging of {model}/{dataset}", go)

    def log_tables(self, tables: dict[str, list[dict]], files: list[Path] = ()) -> None:
        """Put the report's tables (one per paper table) and files on the parent run."""
        def go():
            parent = self.parent_run_id()
            for name, rows in tables.items():
                if rows:
                    cols = sorted({k for r in rows for k in r})
                    data = {c: [r.get(c) for r in rows] for c in cols}
                    self.client.log_table(parent, data=data, artifact_file=f"tables/{name}.json")
            for f in files:
                if Path(f).is_file():
                    self.client.log_artifact(parent, str(f), artifact_path="report")
            self.client.set_terminated(parent, status="FINISHED")  # the report closes a grid execution
        self._safe("report tables", go)


def _loss_points(tm: dict) -> list[tuple[int, float]]:
    curve = tm.get("loss_curve") or tm.get("losses") or tm.get("loss") or []
    if not isinstance(curve, list):
        return []
    out = []
    for i, item in enumerate(curve):
        if isinstance(item, dict):
            out.append((int(item.get("step", i)), float(item.get("loss"))))
        elif isinstance(item, (list, tuple)):
            out.append((int(item[0]), float(item[1])))
        else:
            out.append((i + 1, float(item)))
    return out


def train_summary(tm: dict) -> dict:
    """Scalars of a train_metrics.json: params, wall time, mean step time, tokens/s, memory, final loss."""
    pts = _loss_points(tm)
    steps = tm.get("step_time_s")
    step_time = (sum(steps) / len(steps)) if isinstance(steps, list) and steps else steps
    return {"trainable_params": tm.get("trainable_params"), "wall_time_s": tm.get("wall_time_s"),
            "train_time_s": tm.get("train_time_s"), "step_time_s": step_time, "tokens_per_s": tm.get("tokens_per_s"),
            "peak_memory_mb": tm.get("peak_memory_mb"), "final_loss": pts[-1][1] if pts else None,
            "first_loss": pts[0][1] if pts else None}


def make_tracker(params, *, enabled: bool | None = None, grid_id: str | None = None):
    """The tracker a stage should use: MLflow when params say so, else the null tracker."""
    on = params.tracking.enabled if enabled is None else enabled
    if not on or os.environ.get("DOMLORA_TRACKING", "").lower() in ("0", "off", "false"):
        return NullTracker()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    return MlflowTracker(uri=uri, experiment=params.tracking.experiment, profile=params.profile,
                         grid_id=grid_id or grid_id_for(params.profile, params.grid_hash()), params_hash=params.grid_hash())


def params_md5(params) -> str:
    return hashlib.md5(json.dumps(params.raw, sort_keys=True, default=str).encode()).hexdigest()

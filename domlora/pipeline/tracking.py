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
import re
from pathlib import Path
from typing import Any

from domlora.config import flatten
from domlora.provenance import git_commit
from domlora.train.config import TrainRecord

logger = logging.getLogger(__name__)

PENDING = ".tracking_pending"
SECRET_WORDS = ("key", "token", "secret", "password", "auth", "credential")
"""a param whose name has one of these as a whole word (`api_key`, `hf_token`) is never logged; `max_new_tokens` is"""


def grid_id_for(profile: str, params_hash: str) -> str:
    """A grid execution's id: $DOMLORA_GRID_ID (set by the Prefect flow), else profile + params hash."""
    return os.environ.get("DOMLORA_GRID_ID") or f"{profile}-{params_hash}"


def _is_secret(name: str) -> bool:
    words = re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])", name.lower())
    return any(w in SECRET_WORDS or w in ("apikey", "accesstoken") for w in words)


def _scrub(d: dict) -> dict:
    return {k: v for k, v in d.items() if not _is_secret(k)}


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
        tags = {"model": cell.model, "dataset": cell.dataset, "method": cell.method, "seed": str(cell.seed),
                "placement": m.placement, "paper_tables": ",".join(map(str, m.tables)),
                "dvc_stage": f"train@{cell.id}"}
        rid = self.cell_run_id(cell.id, tags)
        for k, v in tags.items():
            self.client.set_tag(rid, f"domlora.{k}" if k in ("model", "dataset", "method") else k, v)
        placement_path = layout.placement(cell.model, cell.dataset, cell.method)
        metrics: list = []
        p: dict[str, Any] = {}
        tm_path = layout.train_metrics(cell)
        if tm_path.is_file():
            rec = TrainRecord.read(tm_path)
            p = record_params(rec) | {"dataset": cell.dataset, "method": cell.method}
            for step, loss in enumerate(rec.loss, 1):
                if loss is not None:
                    metrics.append(Metric("train/loss", float(loss), 0, step))
            for step, r in enumerate(rec.reward, 1):
                metrics.append(Metric("train/reward", float(r), 0, step))
            for key, value in train_summary(rec).items():
                if isinstance(value, (int, float)):
                    metrics.append(Metric(f"train/{key}", float(value), 0, 0))
            self.client.set_tag(rid, "variant", rec.variant)
            self.client.set_tag(rid, "domlora.train_status", rec.status)
        ev_path = layout.scores_json(cell)
        if ev_path.is_file():
            for k, v in json.loads(ev_path.read_text()).items():
                if isinstance(v, (int, float)):
                    metrics.append(Metric(f"eval/{k}".replace("@", "_at_"), float(v), 0, 0))
        params_list = [Param(k, str(v)[:6000]) for k, v in _scrub(p).items()]
        existing = self.client.get_run(rid).data.params
        params_list = [x for x in params_list if x.key not in existing]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(rid, metrics=metrics[i:i + 900])
        for i in range(0, len(params_list), 90):
            self.client.log_batch(rid, params=params_list[i:i + 90])
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


def record_params(rec: TrainRecord) -> dict[str, Any]:
    """MLflow params of a cell, all read from its training record: the TrainConfig as trained (every field
    by its name), the model as loaded, the placement, and the study sections (`grpo.*`, `sparse_b.*`)."""
    study = {k: v for k, v in rec.study.items() if k != "outcome" and v is not None}
    modules = rec.placement.get("modules", [])
    return (dict(rec.config) | {"model": rec.model.get("id"), "model_dtype": rec.model.get("dtype"),
                                "regime": rec.regime, "placement": rec.placement.get("strategy"),
                                "n_target_modules": len(modules), "target_modules": ",".join(modules)[:6000],
                                "trainable_params": rec.trainable_params, "total_params": rec.total_params,
                                "samples_per_step": rec.samples_per_step, "world_size": rec.world_size,
                                "backend": rec.backend}
            | flatten(study))


def train_summary(rec: TrainRecord | dict) -> dict:
    """Scalars of a training record: params, wall time, mean step time, tokens/s, memory, first and last loss."""
    if isinstance(rec, dict):
        rec = TrainRecord(**({"config": {}, "model": {}, "placement": {}} | rec))
    losses = [x for x in rec.loss if x is not None]
    steps = rec.step_time_s
    return {"trainable_params": rec.trainable_params, "wall_time_s": rec.wall_time_s,
            "train_time_s": rec.train_time_s, "step_time_s": (sum(steps) / len(steps)) if steps else None,
            "tokens_per_s": rec.tokens_per_s, "peak_memory_mb": rec.peak_memory_mb,
            "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
            "samples_per_step": rec.samples_per_step or None}


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

"""A grid spread over several hosts, rehearsed on loopback: one Prefect server, one MLflow server, one DVC
remote (a folder), two GPU hosts and a report host, each a `git clone` of the committed repository.

1. the grid (the `ci` profile by default) runs through the `domlora/cluster-grid` deployment: its cells
   land on both GPU hosts' workers, the report host gathers everything from the remote and renders the
   report; every cell is a child of the grid's one MLflow parent run;
2. the deployment run again computes nothing;
3. faults: a tracking server that does not answer and a host at another commit are refused before any
   cell starts; a GPU host killed in the middle of a cell (with the tracking server stopped at the same
   moment) -> the cell is sent again, finishes on the other host with the same scores, and `domlora sync`
   logs it once the server is back.

Prints a transcript in numbers (cells per host, wall times, bytes pushed and pulled) and exits non-zero
when a check fails.

Run as: python scripts/rehearse_cluster.py [--profile ci] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
GPU_HOSTS = ("host_a", "host_b")
REPORT_HOST = "report"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str] | str, cwd: Path, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} in {cwd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _logs(clone: Path) -> dict[str, float]:
    """Stages this clone computed (their logs) and when."""
    d = clone / ".domlora_logs"
    return {p.stem.replace("__", "@"): p.stat().st_mtime for p in d.glob("*.log")} if d.is_dir() else {}


class Check:
    """Collects the rehearsal's checks; any that fails makes the exit status non-zero."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


class Cluster:
    """The simulated hosts and the services, all started (and stopped) by PID."""

    def __init__(self, work: Path, *, profile: str, params: Path | None, crash_after: float, heartbeat: int):
        self.work = work
        self.remote = work / "remote"
        self.prefect_port, self.mlflow_port = _free_port(), _free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.base_env = os.environ | {
            "PREFECT_API_URL": self.api, "PREFECT_PORT": str(self.prefect_port), "MLFLOW_PORT": str(self.mlflow_port),
            "DOMLORA_TRACKING_DIR": str(work / "mlflow-server"), "DOMLORA_CRASH_AFTER_S": str(crash_after),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat), "PREFECT_WORKER_QUERY_SECONDS": "2",
            "DOMLORA_UNITS_PER_HOST": "1", "DOMLORA_GPU_SLOTS": "2",
            # the simulated hosts share this machine's cores: one thread each
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.base_env.pop("MLFLOW_TRACKING_URI", None)
        self.base_env.pop("PYTHONPATH", None)
        self.profile, self.params = profile, params
        self.clones: dict[str, Path] = {}

    # -- set-up
    def make_origin(self) -> Path:
        origin = self.work / "origin"
        _run(["git", "clone", "-q", str(SRC), str(origin)], self.work)
        if self.params is not None:
            shutil.copy(self.params, origin / "params.yaml")
        _run([str(SRC / ".venv/bin/python"), "-m", "domlora", "profile", "use", self.profile], origin,
             env=self.base_env | {"PYTHONPATH": str(origin)})
        _run("git add -A && git -c user.name=rehearsal -c user.email=r@localhost commit -qm "
             f"'rehearsal: profile {self.profile}' || true", origin)
        return origin

    def clone(self, origin: Path, name: str) -> Path:
        c = self.work / name
        _run(["git", "clone", "-q", str(origin), str(c)], self.work)
        (c / ".venv").symlink_to(SRC / ".venv")
        _run([str(c / ".venv/bin/dvc"), "remote", "add", "--local", "-d", "store", str(self.remote)], c)
        self.clones[name] = c
        return c

    def role(self, name: str, *args: str, env: dict | None = None) -> str:
        return _run(["bash", "scripts/cluster.sh", *args], self.clones[name], env=self.base_env | (env or {}))

    def start(self) -> None:
        self.remote.mkdir()
        origin = self.make_origin()
        for name in (*GPU_HOSTS, REPORT_HOST):
            self.clone(origin, name)
        self.role(REPORT_HOST, "server")
        self.role(REPORT_HOST, "tracking")
        for h in GPU_HOSTS:
            self.role(h, "gpu-worker")
        self.role(REPORT_HOST, "grid-worker", env={"MLFLOW_TRACKING_URI": self.tracking_uri})
        self.wait_workers(3)

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        from prefect.client.orchestration import get_client

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with get_client(sync_client=True) as client:
                online = [w for w in client.read_workers_for_work_pool("domlora-pool") if w.status == "ONLINE"]
            if len(online) >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"{n} workers did not come online in {timeout:.0f} s")

    def pids(self) -> list[int]:
        out = []
        for c in self.clones.values():
            for f in (c / ".prefect").glob("*.pid"):
                try:
                    out.append(int(f.read_text()))
                except ValueError:
                    pass
        return out

    def kill_tree(self, pid: int) -> int:
        """SIGKILL a process and everything it started (a host going away); returns how many."""
        import psutil

        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return 0
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return len(procs)

    def stop(self) -> None:
        import psutil

        trees = []
        for pid in self.pids():
            try:
                trees.append([psutil.Process(pid), *psutil.Process(pid).children(recursive=True)])
            except psutil.NoSuchProcess:
                pass
        for name in self.clones:
            self.role(name, "stop")
        time.sleep(2)
        for tree in trees:  # whatever a stopped worker left behind
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    # -- runs
    def run_grid(self, *, force: list[str] | None = None, wait: bool = True):
        from prefect.deployments import run_deployment

        params = {"force": force} if force else {}
        return run_deployment("domlora/cluster-grid", parameters=params, timeout=None if wait else 0, poll_interval=3)

    def wait_run(self, run_id, timeout: float = 1800):
        from prefect.client.orchestration import get_client

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(3)
        raise RuntimeError(f"flow run {run_id} did not finish in {timeout:.0f} s")

    def units(self, grid_id: str) -> list:
        """The unit flow runs (`domlora-stages/gpu`) of one grid execution, oldest first."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])),
                                         limit=200)
        runs = [r for r in runs if r.parameters.get("grid_id") == grid_id]
        return sorted(runs, key=lambda r: r.created)

    def host_of(self, message: str) -> str | None:
        for name, c in self.clones.items():
            if message.split(" | ", 1)[0].endswith(str(c)):
                return name
        return None


def cells_of(clone: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load((clone / "grid.yaml").read_text())["cells"])


def lock_stages(clone: Path) -> dict:
    """The clone's dvc.lock entries of the active grid's stages (not those of other profiles' grids; an entry
    of a stage the clone never touched may still be the committed one of another profile)."""
    import yaml

    g = yaml.safe_load((clone / "grid.yaml").read_text())
    names = ({f"prepare_data@{d}" for d in g["datasets"]} | {f"probe@{k}" for k in g["probes"]}
             | {f"select@{k}" for k in g["selects"]} | {f"{s}@{k}" for k in g["cells"] for s in ("train", "evaluate")}
             | {f"evaluate_base@{k}" for k in g["bases"]} | {"report"})
    p = clone / "dvc.lock"
    lock = yaml.safe_load(p.read_text()).get("stages", {}) if p.is_file() else {}
    return {n: e for n, e in lock.items() if n in names}


def out_bytes(entry: dict) -> int:
    return sum(o.get("size", 0) for o in entry.get("outs", []))


def mlflow_cells(uri: str, experiment: str, grid_id: str) -> dict[str, dict]:
    """Per cell under the grid's parent run: its eval/train metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`domlora.grid_id` = '{grid_id}' and "
                                                                   "tags.`domlora.kind` = 'grid'")
    if len(parents) != 1:
        return {"_parents": {"n": len(parents)}}
    kids = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return {r.data.tags.get("domlora.cell_id"): r.data.metrics for r in kids}


def rehearse(a: argparse.Namespace) -> dict:
    work = Path(a.work or tempfile.mkdtemp(prefix="domlora-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(work / "prefect-client")
    cl = Cluster(work, profile=a.profile, params=Path(a.params) if a.params else None,
                 crash_after=a.crash_after, heartbeat=a.heartbeat)
    os.environ.update({"PREFECT_API_URL": cl.api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"})
    check = Check()
    t: dict = {"work": str(work), "profile": a.profile}
    try:
        t0 = time.monotonic()
        cl.start()
        t["setup_s"] = round(time.monotonic() - t0, 1)
        report = cl.clones[REPORT_HOST]
        cells = cells_of(report)
        import yaml

        experiment = yaml.safe_load((report / "params.yaml").read_text())["run"]["tracking"]["experiment"]
        print(f"cluster up in {t['setup_s']} s: Prefect {cl.api}, MLflow {cl.tracking_uri}, remote {cl.remote}; "
              f"grid of {len(cells)} cells", flush=True)

        # 1. the grid, spread
        print("1. the grid through domlora/cluster-grid", flush=True)
        t0 = time.monotonic()
        run = cl.run_grid()
        t["grid_s"] = round(time.monotonic() - t0, 1)
        grid_id = f"prefect-{run.id}"
        check(run.state.is_completed(), f"grid {run.name} {run.state.name} in {t['grid_s']} s: {run.state.message}")
        units = cl.units(grid_id)
        per_host: dict[str, list[str]] = {}
        for u in units:
            host = cl.host_of(u.state.message or "") if u.state.is_completed() else None
            per_host.setdefault(host or "?", []).extend(u.parameters["stages"])
        t["units"] = {h: sorted(v) for h, v in per_host.items()}
        t["cells_per_host"] = {h: sorted({n.split("@", 1)[1] for n in v if n.startswith("train@")})
                               for h, v in per_host.items()}
        computed = {name: sorted(_logs(c)) for name, c in cl.clones.items()}
        t["computed_per_clone"] = computed
        check(all(t["cells_per_host"].get(h) for h in GPU_HOSTS),
              f"cells on both GPU hosts: {t['cells_per_host']}")
        check(not any(n.split("@")[0] in ("probe", "train", "evaluate", "evaluate_base") for n in computed[REPORT_HOST]),
              f"the report host computed no heavy stage ({', '.join(computed[REPORT_HOST])})")
        every = [n for c in cl.clones.values() for n in _logs(c)]
        check(len(every) == len(set(every)), "no stage computed on two hosts")
        check((report / "reports" / "README.md").is_file() and all(
            c in (report / "reports" / "README.md").read_text() for c in cells), "the report names every cell")
        status = _run([str(report / ".venv/bin/dvc"), "status"], report)
        check("up to date" in status, f"dvc status on the report host: {status.strip()[:200]}")
        lock = lock_stages(report)
        check(all(f"{k}@{c}" in lock for c in cells for k in ("train", "evaluate")),
              f"the report host's dvc.lock records every stage ({len(lock)} stages)")
        check(all(lock_stages(cl.clones[h]).get(n) == lock.get(n) for h in GPU_HOSTS for n in _logs(cl.clones[h])),
              "one record: each GPU host's dvc.lock entry for what it computed is the report host's")
        t["remote_bytes"] = _size(cl.remote)
        # a clone's DVC cache started empty: what it holds it either computed or pulled from the remote
        made = {name: sum(out_bytes(e) for n, e in lock_stages(c).items() if n in _logs(c))
                for name, c in cl.clones.items()}
        t["pushed_bytes"] = {name: sum(out_bytes(e) for n, e in lock_stages(c).items()
                                       if n in _logs(c) and n != "report") for name, c in cl.clones.items()}
        t["pulled_bytes"] = {name: max(0, _size(c / ".dvc" / "cache" / "files") - made[name])
                             for name, c in cl.clones.items()}
        tracked = mlflow_cells(cl.tracking_uri, experiment, grid_id)
        check(set(cells) <= set(tracked) and all(any(k.startswith("eval/") for k in tracked[c]) for c in cells),
              f"MLflow: every cell (with eval metrics) under the grid's one parent: {sorted(tracked)}")

        # 2. run again: nothing to compute
        print("2. the deployment again", flush=True)
        before = {name: _logs(c) for name, c in cl.clones.items()}
        t0 = time.monotonic()
        run2 = cl.run_grid()
        t["rerun_s"] = round(time.monotonic() - t0, 1)
        after = {name: _logs(c) for name, c in cl.clones.items()}
        check(run2.state.is_completed(), f"rerun {run2.state.name} in {t['rerun_s']} s")
        check(after == before and not cl.units(f"prefect-{run2.id}"),
              "the rerun computed nothing and sent no unit to the GPU hosts")

        if a.faults:
            _faults(cl, check, t, cells, experiment, kill=a.kill)
    finally:
        if not a.keep_running:
            cl.stop()
    t["failed_checks"] = check.failed
    return t


def _faults(cl: Cluster, check: Check, t: dict, cells: list[str], experiment: str, *, kill: bool) -> None:
    report = cl.clones[REPORT_HOST]
    # 3a. bad input before any cell starts
    print("3a. bad input", flush=True)
    cl.role(REPORT_HOST, "stop", "tracking")
    run = cl.run_grid(force=[cells[0]])
    check(run.state.is_failed() and "does not answer" in (run.state.message or ""),
          f"tracking server down at the start: refused ({(run.state.message or '')[:160]})")
    cl.role(REPORT_HOST, "tracking")
    from prefect.deployments import run_deployment

    head = _run(["git", "rev-parse", "HEAD"], report).strip()
    other = "0" * 40
    run = run_deployment("domlora-stages/gpu", timeout=None, poll_interval=2, parameters={
        "stages": [f"train@{cells[0]}"], "commit": other, "grid_id": "bad-commit"})
    msg = run.state.message or ""
    check(run.state.is_failed() and head[:12] in msg and other[:12] in msg,
          f"a host at another commit than the deployment's refuses, naming both ({msg[:200]})")

    if not kill:
        return
    # 3b. a GPU host dies in the middle of a cell, and the tracking server with it
    print("3b. a GPU host killed mid-cell, tracking server down", flush=True)
    victim_cell = cells[0]
    old_scores = (report / "runs" / victim_cell / "scores.json").read_text()
    old_adapter = _md5(report / "runs" / victim_cell / "adapter" / "adapter_model.safetensors")
    t0 = time.time()
    run = cl.run_grid(force=[victim_cell], wait=False)
    grid_id = f"prefect-{run.id}"
    victim = None
    deadline = time.monotonic() + 900
    while victim is None and time.monotonic() < deadline:
        for h in GPU_HOSTS:
            if _logs(cl.clones[h]).get(f"train@{victim_cell}", 0) > t0:
                victim = h
        time.sleep(0.5)
    if not check(victim is not None, f"the forced cell {victim_cell} started on a GPU host"):
        return
    time.sleep(2)
    cl.role(REPORT_HOST, "stop", "tracking")
    pid = int((cl.clones[victim] / ".prefect" / "worker-gpu.pid").read_text())
    n = cl.kill_tree(pid)
    (cl.clones[victim] / ".prefect" / "worker-gpu.pid").unlink()
    t_kill = time.time()
    print(f"  killed {victim}'s worker and its {n - 1} child processes during train@{victim_cell}", flush=True)
    done = cl.wait_run(run.id)
    t["fault_kill_s"] = round(time.time() - t0, 1)
    check(done.state.is_completed(), f"grid with the lost host {done.state.name} after {t['fault_kill_s']} s")
    units = [u for u in cl.units(grid_id) if f"train@{victim_cell}" in u.parameters["stages"]]
    states = [(u.state.name, cl.host_of(u.state.message or "")) for u in units]
    t["fault_kill_units"] = states
    survivor = next(h for h in GPU_HOSTS if h != victim)
    check(len(units) >= 2 and units[0].state.is_crashed() and units[-1].state.is_completed()
          and states[-1][1] == survivor, f"the cell's unit crashed on {victim}, was sent again, ran on: {states}")
    check(_logs(cl.clones[survivor]).get(f"train@{victim_cell}", 0) > t_kill,
          f"{victim_cell} trained again on {survivor} after the kill")
    check((report / "runs" / victim_cell / "scores.json").read_text() == old_scores
          and _md5(report / "runs" / victim_cell / "adapter" / "adapter_model.safetensors") == old_adapter,
          f"{victim_cell}: the same scores and adapter weights as the uninterrupted run")
    check((cl.clones[survivor] / "runs" / victim_cell / ".tracking_pending").is_file(),
          f"tracking down: {victim_cell} marked pending on {survivor}, its results on disk and on the remote")
    # 3c. the tracking server is back: `domlora sync` logs what it missed, under the grid's parent
    print("3c. tracking back, domlora sync", flush=True)
    cl.role(REPORT_HOST, "tracking")
    _run([str(report / ".venv/bin/python"), "-m", "domlora", "sync", "--grid-id", grid_id], report,
         env=cl.base_env | {"MLFLOW_TRACKING_URI": cl.tracking_uri, "PYTHONPATH": str(report)})
    tracked = mlflow_cells(cl.tracking_uri, experiment, grid_id)
    check(victim_cell in tracked and any(k.startswith("eval/") for k in tracked[victim_cell]),
          f"after `domlora sync`: {victim_cell} with its eval metrics under the grid's parent")
    cl.role(victim, "gpu-worker")  # the host comes back


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Rehearse a grid spread over hosts, on loopback.")
    p.add_argument("--profile", default="ci", help="the params.yaml profile to run (default: ci)")
    p.add_argument("--params", default=None, help="a params.yaml to commit in place of the repository's")
    p.add_argument("--no-faults", dest="faults", action="store_false", help="skip the fault injections")
    p.add_argument("--no-kill", dest="kill", action="store_false",
                   help="skip the host killed mid-cell (the slowest fault: it waits for the crash detection)")
    p.add_argument("--crash-after", type=float, default=75, help="seconds without heartbeat -> crashed")
    p.add_argument("--heartbeat", type=int, default=30, help="flow-run heartbeat period (>= 30)")
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--keep-running", action="store_true", help="leave the services and workers running")
    p.add_argument("--json", default=None, help="write the transcript here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    t = rehearse(a)
    t["total_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(t, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(t, indent=1))
    if not (a.keep or a.keep_running):
        shutil.rmtree(t["work"], ignore_errors=True)
    if t["failed_checks"]:
        print(f"rehearsal: {len(t['failed_checks'])} checks failed", file=sys.stderr)
        return 1
    print(f"rehearsal: every check passed in {t['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

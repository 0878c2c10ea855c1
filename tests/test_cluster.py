"""A grid spread over hosts: the checks before any cell starts (one commit, a tracking server that
answers), how stages are cut into units, that DVC's run-cache covers every stage a host may have to
fetch; and, slow, the whole thing on loopback with real services (scripts/rehearse_cluster.py on a tiny
random model): one Prefect server, one MLflow server, one DVC remote, two GPU-host workers and a report
host, each its own clone. Cells land on both GPU hosts, the report host gathers everything, a rerun
computes nothing, and bad input (tracking server down, a host at another commit) is refused."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from domlora.errors import ConfigError
from domlora.pipeline.cluster import (Unit, check_commit, check_tracking_server, checkout_commit, plan_units,
                                      schedule)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
HEAVY = frozenset({"probe", "train", "evaluate", "evaluate_base"})

PARAMS = """
profiles:
  tiny: &tiny
    profile: tiny
    seed_data: 7
    models:
      toy: {{id: {model}, dtype: float32}}
    datasets:
      arith: {{source: arith, n_train: 16, n_probe: 4, n_eval: 3, tasks: [arith]}}
    probe: {{samples: 4, max_length: 512, alpha: 16, rank: 8, batch_size: 2, nfn: true, reuse_from: null}}
    methods:
      lora: {{placement: all, tables: [1, 10]}}
      domlora: {{placement: dom, lr: 1.0e-3, tables: [1, 10]}}
    train: {{rank: 4, alpha: 8, lr: 1.0e-3, max_steps: 2, batch_size: 2, grad_accum: 1, max_length: 512,
            gradient_checkpointing: false, save_every: 0}}
    eval: {{limit: 2, batch_size: 2, max_gen_toks: 4, allow_code_exec: false}}
    tracking: {{enabled: true, uri: "sqlite:///mlflow.db", experiment: clustertest}}
    grid:
      models: [toy]
      probe_datasets: [arith]
      datasets: [arith]
      methods: [lora, domlora]
      seeds: [0]
run: *tiny
"""


class TestChecks:
    def test_another_commit_is_refused_naming_both(self, tmp_path):
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                       cwd=tmp_path, check=True)
        head = checkout_commit(tmp_path)
        assert check_commit(tmp_path, head) == head
        with pytest.raises(ConfigError, match=f"at commit {head[:12]}, but the deployment runs commit 0000000000"):
            check_commit(tmp_path, "0" * 40)

    def test_not_a_checkout(self, tmp_path):
        with pytest.raises(ConfigError, match="not a git checkout"):
            checkout_commit(tmp_path)

    def test_tracking_server_that_does_not_answer(self):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"tracking server http://127.0.0.1:{port} does not answer"):
            check_tracking_server(f"http://127.0.0.1:{port}", timeout=2)

    def test_a_store_on_one_host_cannot_collect_several(self):
        with pytest.raises(ConfigError, match="a store on one host"):
            check_tracking_server("sqlite:///mlflow.db")


class TestPlanUnits:
    ORDER = ["prepare_data@a", "probe@m-a", "select@m-a-lora", "evaluate_base@m-a", "train@m-a-lora-0",
             "evaluate@m-a-lora-0", "train@m-a-dom-0", "evaluate@m-a-dom-0"]

    def test_a_cell_is_one_unit_heavy_on_gpu_light_here(self):
        units = plan_units(self.ORDER, set(self.ORDER), heavy=HEAVY)
        assert units == [Unit("prepare_data@a", ("prepare_data@a",), False), Unit("probe@m-a", ("probe@m-a",), True),
                         Unit("select@m-a-lora", ("select@m-a-lora",), False),
                         Unit("evaluate_base@m-a", ("evaluate_base@m-a",), True),
                         Unit("m-a-lora-0", ("train@m-a-lora-0", "evaluate@m-a-lora-0"), True),
                         Unit("m-a-dom-0", ("train@m-a-dom-0", "evaluate@m-a-dom-0"), True)]

    UPSTREAM = {"probe@m-a": ("prepare_data@a",), "select@m-a-lora": ("probe@m-a",),
                "evaluate_base@m-a": ("prepare_data@a",), "train@m-a-lora-0": ("prepare_data@a", "select@m-a-lora"),
                "evaluate@m-a-lora-0": ("train@m-a-lora-0",), "train@m-a-dom-0": ("prepare_data@a",),
                "evaluate@m-a-dom-0": ("train@m-a-dom-0",), "probe@m-b": ()}

    def test_the_gpu_hosts_serve_the_cells_first(self):
        order = [*self.ORDER, "probe@m-b"]
        sched = schedule(plan_units(order, set(order), heavy=HEAVY), self.UPSTREAM)
        # the base evaluation and a probe only the report compares wait for every cell; the probe a cell needs
        # does not
        assert sched.late == {"evaluate_base@m-a", "probe@m-b"}
        assert [u.name for u in sched.units][-2:] == ["evaluate_base@m-a", "probe@m-b"]
        assert sched.cells == ["m-a-lora-0", "m-a-dom-0"]
        assert sched.after["m-a-lora-0"] == {"prepare_data@a", "select@m-a-lora"}
        assert sched.after["select@m-a-lora"] == {"probe@m-a"}

    def test_only_what_is_left(self):
        assert plan_units(self.ORDER, {"evaluate@m-a-dom-0"}, heavy=HEAVY) == [
            Unit("m-a-dom-0", ("evaluate@m-a-dom-0",), True)]
        assert plan_units(self.ORDER, set(), heavy=HEAVY) == []


def test_every_stage_a_host_fetches_is_run_cached():
    """DVC's run-cache is how a stage computed on one host is found on another: it is off for a stage with an
    uncached or persisted output, so only the report (kept in git, built where everything is) may have one."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            if not stage.cmd or stage.name == "report":
                continue
            for out in stage.outs:
                assert out.use_cache and not out.persist, f"{stage.name}: {out} must be cached and not persist"


def test_unit_messages_round_trip():
    import flows.domlora_flow as f

    msg = f.unit_message("box:/srv/a", {"train@c": "computed", "evaluate@c": "restored"})
    assert f.parse_unit_message(msg) == {"host": "box:/srv/a", "stages": {"train@c": "computed",
                                                                          "evaluate@c": "restored"}}


def test_forced_cells_stand_for_their_training_and_evaluation():
    import flows.domlora_flow as f

    names = {"train@c-d-m-0", "evaluate@c-d-m-0", "select@c-d-m", "probe@c-d"}
    assert f._forced(["c-d-m-0", "probe@c-d"], names) == {"train@c-d-m-0", "evaluate@c-d-m-0", "probe@c-d"}
    with pytest.raises(ValueError, match="neither a cell nor a stage"):
        f._forced(["nope"], names)


@pytest.mark.slow
def test_grid_spread_over_two_hosts(tmp_path, tiny_tokenizer, monkeypatch):
    from conftest import make_tiny_llama

    import rehearse_cluster

    model_dir = tmp_path / "toy_model"
    make_tiny_llama(len(tiny_tokenizer), layers=3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(model=model_dir))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    t = rehearse_cluster.rehearse(rehearse_cluster.parse_args(
        ["--profile", "tiny", "--params", str(params), "--work", str(tmp_path / "work"), "--no-kill"]))
    assert t["failed_checks"] == []
    assert set(t["cells_per_host"]) >= {"host_a", "host_b"}


@pytest.mark.slow
def test_spread_grid_without_a_remote_is_refused_before_any_stage(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.domlora_flow import domlora

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    monkeypatch.chdir(clone)
    with prefect_test_harness(server_startup_timeout=90):
        state = domlora(root=str(clone), spread=True, return_state=True)
    assert state.is_failed() and "no default DVC remote" in state.message
    assert not (clone / ".domlora_logs").exists()

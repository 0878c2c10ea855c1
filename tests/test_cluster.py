"""A grid spread over hosts, on loopback with real services (scripts/rehearse_cluster.py on a tiny random
model): one Prefect server, one MLflow server, one DVC remote, two GPU-host workers and a report host, each
its own clone. Cells land on both GPU hosts, the report host gathers everything, a rerun computes nothing,
and bad input (tracking server down, a host at another commit) is refused before any cell starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

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


def test_committed_checkout_required():
    # the rehearsal clones the committed repository: it needs a git checkout with the scripts committed
    out = subprocess.run(["git", "ls-files", "scripts/rehearse_cluster.py", "scripts/cluster.sh"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.stdout.split() == ["scripts/cluster.sh", "scripts/rehearse_cluster.py"]


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

"""The flow splits a CPU's cores among the stages it runs side by side."""
from __future__ import annotations

import os

import pytest

flow_mod = pytest.importorskip("flows.domlora_flow")


def test_cores_shared_among_parallel_cells(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    flow_mod._share_cpu_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == "4" and os.environ["MKL_NUM_THREADS"] == "4"
    monkeypatch.delenv("OMP_NUM_THREADS")
    flow_mod._share_cpu_threads(16)  # never below one thread
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_user_setting_and_gpus_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    flow_mod._share_cpu_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    flow_mod._share_cpu_threads(2)
    assert "OMP_NUM_THREADS" not in os.environ

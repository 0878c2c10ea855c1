"""The cost meter sees the work's own memory: a live reading it has seen move, above a baseline without garbage."""
from __future__ import annotations

import pytest

import domlora.memory as memory
from domlora.memory import measure_cost


class Reading:
    """A memory reading measure_cost can take, and an allocation of `mb` MB, touched, that it must see."""

    def __init__(self, kind: str):
        self.kind = kind

    def allocate(self, mb: int):
        import mmap

        import numpy as np

        if self.kind == "malloc_heap_sampled":  # what tensors and arrays do: a heap block
            a = np.ones(mb * 2**20 // 8)
            a += 1
            return a
        # fresh anonymous pages: what a resident reading sees whatever the heap reuses
        m = mmap.mmap(-1, mb * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        return m


@pytest.fixture(params=["heap", "proc"])
def reading(request, monkeypatch):
    """Each live memory reading measure_cost can take: glibc's heap, and /proc's anonymous RSS where the heap
    cannot be read (not glibc)."""

    if request.param == "heap":
        heap = memory._malloc_heap_reader()
        if heap is None or not memory._moves(heap):
            pytest.skip("no live glibc heap count here (not glibc >= 2.33, or another allocator)")
        return Reading("malloc_heap_sampled")
    monkeypatch.setattr(memory, "_malloc_heap_reader", lambda: None)
    if not memory._moves(memory._proc_anon_mb):
        pytest.skip("this process's /proc status does not follow its memory here")
    return Reading("process_rss_sampled")


def test_measure_cost_sees_an_allocation(reading):
    with measure_cost(interval_s=0.005) as cost:
        a = reading.allocate(40)
        import time

        time.sleep(0.05)
    del a
    assert cost["memory_kind"] == reading.kind
    assert cost["peak_over_model_mb"] > 20, cost


def test_measure_cost_sees_an_allocation_under_an_earlier_peak(reading):
    """Work smaller than what the process once held is still seen: the reading is live, not the peak so far."""
    big = reading.allocate(200)
    del big
    with measure_cost(interval_s=0.005) as cost:
        a = reading.allocate(40)
    del a
    assert cost["memory_kind"] == reading.kind
    assert 20 < cost["peak_over_model_mb"] < 150, cost


def test_a_frozen_proc_reading_is_not_taken(tmp_path, monkeypatch, caplog):
    """A /proc status whose figures do not follow the process (a sandbox's, another namespace's): a reading must
    be seen to move before it is trusted, else every cost reads 0 and says nothing of why."""

    frozen = tmp_path / "status"
    frozen.write_text("Name:\tpython\nVmRSS:\t 500000 kB\nRssAnon:\t 400000 kB\n")
    (tmp_path / "statm").write_text("200000 125000 100 1 0 100000 0\n")
    monkeypatch.setattr(memory, "_PROC_STATUS", str(frozen))
    assert memory._proc_anon_mb() == pytest.approx(400000 / 1024)
    assert memory._memory_reader()[1] == ("malloc_heap_sampled" if memory._malloc_heap_reader() else "process_max_rss")
    monkeypatch.setattr(memory, "_malloc_heap_reader", lambda: None)
    with caplog.at_level("WARNING", logger="domlora.memory"), measure_cost(interval_s=0.005) as cost:
        pass
    assert cost["memory_kind"] == "process_max_rss"
    assert "no live memory reading" in caplog.text


def test_measure_cost_leaves_out_file_backed_pages(tmp_path):
    """Pages of a mapped file (weights read through mmap) are the kernel's to drop and re-read: they are not
    the work's memory, and counting them lets the baseline move under the work."""
    import mmap

    f = tmp_path / "weights.bin"
    f.write_bytes(b"\1" * (40 * 2**20))
    with open(f, "rb") as fh, measure_cost(interval_s=0.005) as cost:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page touched
        import time

        time.sleep(0.05)
        m.close()
    assert cost["peak_over_model_mb"] < 10


def test_measure_cost_baseline_holds_no_pending_garbage(reading):
    """Cyclic garbage left by earlier work and freed inside the block must not hide the block's memory."""
    import gc

    class Cycle:
        def __init__(self):
            self.me, self.data = self, reading.allocate(80)  # 80 MB, touched, only the collector frees it

    gc.disable()
    try:
        Cycle()
        with measure_cost(interval_s=0.005) as cost:
            gc.collect()  # what an allocation-triggered collection does inside the work
            a = reading.allocate(40)
        del a
    finally:
        gc.enable()
    assert cost["memory_kind"] == reading.kind
    assert cost["peak_over_model_mb"] > 20, cost

"""What a piece of work costs: wall time and peak memory above what was resident when it started
(`measure_cost`), read live from glibc's heap or /proc where this process can, else its peak so far."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)


_PROC_STATUS = "/proc/self/status"


def _proc_anon_mb() -> float:
    """The process's anonymous resident memory (its heap, tensors and arrays), in MB, from /proc.

    File-backed pages (mapped weight files, shared libraries) are left out: the kernel may drop or
    re-read them at any time, which would move the baseline under the work being measured.
    """
    with open(_PROC_STATUS) as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{_PROC_STATUS} has no RssAnon line")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_heap_reader():
    """glibc's live allocation count (`mallinfo2`, every arena: bytes in use plus large mmapped blocks), or None."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _MallInfo2

    def read() -> float:
        m = fn()
        return (m.uordblks + m.hblkhd) / 2**20

    return read


def _statm_resident_mb() -> float:
    with open(_PROC_STATUS.replace("status", "statm")) as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PROBE_MB = 16


def _moves(read) -> bool:
    """Whether `read` sees a fresh allocation of _PROBE_MB now: a reading that cannot be read (no /proc in a
    chroot or another PID namespace), or whose figure does not follow the process, fails this.

    The allocation is both kinds the work makes: fresh anonymous pages, touched (what resident readings see;
    the heap may reuse pages already resident), and a heap block (what the allocator's count sees).
    """
    import mmap

    n = _PROBE_MB * 2**20
    try:
        before = read()
        pages = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # anonymous, as the work's pages
        for i in range(0, n, mmap.PAGESIZE):
            pages[i] = 1
        block = bytearray(n)
        after = read()
        del block
        pages.close()
    except (OSError, ValueError, IndexError):
        return False
    return after - before >= _PROBE_MB / 2


def _memory_reader():
    """The best live memory reading this process has, as (read() -> MB, memory_kind).

    Each candidate is tried on a small allocation first, and the first that sees it is taken: glibc's live heap
    (what tensors and arrays hold, counted by the allocator itself, so always current, even for a block placed
    in pages the heap already holds resident, which resident figures miss); /proc's anonymous resident memory;
    /proc's whole resident set (file-backed pages in); else the process's peak so far, which cannot see
    work that stays under an earlier peak (its kind says so).
    """
    for read, kind in ((_malloc_heap_reader(), "malloc_heap_sampled"), (_proc_anon_mb, "process_rss_sampled"),
                       (_statm_resident_mb, "process_rss_with_files_sampled")):
        if read is not None and _moves(read):
            return read, kind
    logger.warning("no live memory reading in this process: peak memory is the process's peak so far")
    return _max_rss_mb, "process_max_rss"


@contextlib.contextmanager
def measure_cost(device: str = "cpu", *, interval_s: float = 0.02) -> Iterator[dict]:
    """Wall time and peak memory of the enclosed work, above what was resident when it started.

    CPU: glibc's live heap (tensors and arrays; mapped weight files left out), else the process's anonymous
    resident memory (`_memory_reader`), sampled every `interval_s` by a thread (so a short spike between samples
    can be missed); CUDA: `torch.cuda.max_memory_allocated`. Fills the yielded dict on exit; `memory_kind`
    names the reading.
    """
    cost: dict = {}
    cuda = device.startswith("cuda")
    # garbage still waiting for the cycle collector is resident now and may be freed inside the block:
    # collected first, it cannot hide the work's own memory behind a falling baseline
    gc.collect()
    read, kind = _memory_reader()
    start = read()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], read())

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], read())
        cost.update({"wall_s": round(wall, 3), "peak_rss_mb": round(peak[0], 1),
                     "peak_over_model_mb": round(peak[0] - start, 1), "memory_kind": kind})
        if cuda:
            cost.update({"peak_over_model_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                         "memory_kind": "cuda_max_allocated"})

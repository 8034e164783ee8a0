"""Thread pools sized to the cores actually free, so a busy machine does not cost 5x.

BLAS (numpy's and scipy's OpenBLAS) and onnxruntime each default to one thread per CPU. When
another process holds a core, their threads wait for it (onnxruntime's spinning ones burn the
core meanwhile), and every small product pays a scheduler slice: on the shared 2-core machine a
digits CNN prune took 17 s with two BLAS threads against 2 s with one. A run therefore uses the
CPUs it may run on (affinity mask, cgroup quota) less those the 1-minute load average says other
work keeps busy, or the number asked for (`--threads`); onnxruntime sessions never spin. The
pruned model does not depend on the count: Hessian sums are products on one BLAS thread each,
summed in a fixed order (`map_ordered`), and the solvers' and onnxruntime's larger products split
their outputs, not their sums, across threads (tests/test_threads.py checks byte equality).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from onnx_obs.algorithms.blas_threads import blas_threads

_current: int | None = None   # the running prune's thread count, for onnxruntime sessions


def available_cores() -> int:
    """CPUs this process may run on (affinity mask), capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def free_cores() -> int:
    """available_cores() less the cores that the load average says are busy (at least 1)."""
    n = available_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, n - busy)


def _cgroup_quota() -> int | None:
    """Whole CPUs allowed by cgroup v2 cpu.max or v1 cfs quota (rounded up), None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else -(-int(quota) // int(period))
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else -(-quota // period)
    except (OSError, ValueError):
        return None


def current_threads() -> int:
    """The running prune's thread count, else the available cores."""
    return _current or available_cores()


def map_ordered(fn, items: list) -> list:
    """[fn(x) for x in items] on current_threads() Python threads, for work that releases the GIL
    (numpy on one BLAS thread each): the results, and what is summed from them in order, do not
    depend on the thread count."""
    n = min(current_threads(), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, items))


@contextmanager
def run_threads(threads: int | None):
    """For one run: BLAS and onnxruntime use `threads` (None or 0: free_cores()); yields the count."""
    global _current
    n = threads or free_cores()
    before, _current = _current, n
    try:
        with blas_threads(n):
            yield n
    finally:
        _current = before

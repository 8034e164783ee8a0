"""Thread pools sized to the cores actually free, so a busy machine does not cost 5x.

BLAS (numpy's and scipy's OpenBLAS) and onnxruntime each default to one thread per CPU. When
another process holds a core, their threads wait for it (onnxruntime's spinning ones burn the
core meanwhile), and every small product pays a scheduler slice: on the shared 2-core machine a
digits CNN prune took 17 s with two BLAS threads against 2 s with one. A run therefore uses the
CPUs it may run on (affinity mask, cgroup quota) that are idle now, or the number asked for
(`--threads`); onnxruntime sessions never spin. "Idle now" is measured over a short window of
/proc/stat, not read off the load average: the 1-minute average still counts work that ended
seconds ago (a prune right after another one, or after exporting its model, saw a load of 1 on an
idle 2-core machine and ran on one thread: ResNet-18 took 103 s instead of 81 s).
A layer-wise prune or quantization (the default paths) does not depend on the count
(tests/test_threads.py checks byte equality; structured and full-network OBS still let BLAS thread).
OpenBLAS's own threads would break that: its threaded products and Cholesky factorisations round
differently with the count (about 1e-6 relative on a 256x2304 layer, enough to flip near-tied
mask choices: ResNet-18's output MSE moved from 0.01116 on two threads to 0.01096 on one). So the
solvers run BLAS on one thread and split their largest products themselves, into pieces whose
shapes do not depend on the count (Hessian chunks of rows, `panel_matmul`'s column panels), run
`current_threads()` at a time and put together in a fixed order (`map_ordered`); factorisations
and SparseGPT stay on one thread. (The pieces are numpy products: scipy's BLAS wrappers hold the
GIL, so their pieces would not run side by side; a blocked Cholesky factorisation built that way
took 1.19 s for 4608 columns on two threads against LAPACK's 0.94 s on one.)
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from onnx_obs.algorithms.blas_threads import blas_threads, one_blas_thread

_current: int | None = None   # the running prune's thread count, for onnxruntime sessions


def available_cores() -> int:
    """CPUs this process may run on (affinity mask), capped by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def free_cores() -> int:
    """available_cores() less those other work keeps busy now (at least 1)."""
    n = available_cores()
    idle = idle_cpus()
    if idle is None:  # no /proc/stat: the load average, which lags by up to a minute
        try:
            idle = n - os.getloadavg()[0]
        except OSError:
            idle = n
    return max(1, min(n, int(idle + 0.5)))


def idle_cpus(window: float = 0.1, stat: str = "/proc/stat") -> float | None:
    """How many of this process's CPUs (affinity mask) sat idle over the next `window` seconds,
    from the per-CPU jiffies in /proc/stat; None where it cannot be read."""
    try:
        mine = os.sched_getaffinity(0)
        before = _cpu_jiffies(stat)
        time.sleep(window)
        after = _cpu_jiffies(stat)
    except (OSError, AttributeError, ValueError):
        return None
    idle = 0.0
    for cpu in mine & before.keys() & after.keys():
        (i0, t0), (i1, t1) = before[cpu], after[cpu]
        idle += (i1 - i0) / (t1 - t0) if t1 > t0 else 1.0
    return idle if mine & before.keys() else None


def _cpu_jiffies(stat: str) -> dict[int, tuple[int, int]]:
    """{cpu: (idle + iowait jiffies, all jiffies)} from the cpuN lines of /proc/stat."""
    out = {}
    with open(stat) as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                ticks = [int(x) for x in fields]
                out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks[:8]))
    return out


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


PANEL = 256  # columns per piece of panel_matmul: fixed, so the pieces are the same whatever the count


def panel_matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B (Fortran order), its column panels of PANEL each on one BLAS thread,
    current_threads() at a time: the same numbers whatever the thread count (module doc)."""
    out = np.empty((A.shape[0], B.shape[1]), dtype=np.result_type(A, B), order="F")

    def panel(j: int) -> None:
        np.matmul(A, B[:, j:j + PANEL], out=out[:, j:j + PANEL])

    with one_blas_thread():
        map_ordered(panel, list(range(0, B.shape[1], PANEL)))
    return out


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

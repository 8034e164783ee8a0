"""BLAS threads: a context for a run's thread count (onnx_obs/threads.py), one thread for small work.

A small matrix product or rank-1 update (well under a millisecond) loses more to waking and
waiting for BLAS worker threads than it gains, and far more when other processes hold the cores:
on the shared 2-core test machine, loops of such calls ran 10-40x slower with two OpenBLAS threads
than with one, and a whole 384x384 fast-mode prune took 0.78 s instead of 0.01 s. Threaded BLAS
also rounds differently with the thread count. So the solvers' factorisations, SparseGPT and the
greedy loops run under `one_blas_thread()`, and their large products split themselves over the
run's threads in pieces of fixed shape (onnx_obs/threads.py: panel_matmul).

The thread count is set through threadpoolctl where it is installed, else by calling OpenBLAS's
own `openblas_set_num_threads` (numpy's and scipy's copies, found among the loaded libraries);
with another BLAS and no threadpoolctl the defaults stay.
"""

from __future__ import annotations

import ctypes
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional
    ThreadpoolController = None

class _OpenBLAS:
    """get/set the thread count of every OpenBLAS loaded in this process (Linux: /proc/self/maps)."""

    def __init__(self):
        self.libs = []
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()
                                and line.split()[-1].startswith("/")})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_", ""):
                for suffix in ("64_", ""):
                    name = f"{prefix}openblas_set_num_threads{suffix}"
                    get = f"{prefix}openblas_get_num_threads{suffix}"
                    if hasattr(lib, name) and hasattr(lib, get):
                        self.libs.append((getattr(lib, get), getattr(lib, name)))
                        break
                else:
                    continue
                break

    def get(self) -> list[int]:
        return [get() for get, _ in self.libs]

    def set(self, counts: list[int]) -> None:
        for (_, set_), n in zip(self.libs, counts):
            set_(ctypes.c_int(n))


@cache
def _controller():
    if ThreadpoolController is not None:
        return ThreadpoolController()
    import numpy  # noqa: F401  (load numpy's and scipy's BLAS before looking for them)
    import scipy.linalg  # noqa: F401

    return _OpenBLAS()


@contextmanager
def blas_threads(n: int):
    """Context in which every BLAS loaded by numpy and scipy runs at most n threads."""
    c = _controller()
    if isinstance(c, _OpenBLAS):
        with _openblas_limit(c, n):
            yield
    else:
        with c.limit(limits=n, user_api="blas"):
            yield


def one_blas_thread() -> AbstractContextManager:
    """Context in which BLAS libraries (numpy's and scipy's) use a single thread."""
    c = _controller()
    if isinstance(c, _OpenBLAS):
        return _openblas_limit(c, 1) if c.libs else nullcontext()
    return c.limit(limits=1, user_api="blas")


@contextmanager
def _openblas_limit(c: _OpenBLAS, n: int):
    before = c.get()
    c.set([n] * len(before))
    try:
        yield
    finally:
        c.set(before)

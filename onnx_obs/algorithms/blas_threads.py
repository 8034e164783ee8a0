"""Keep small BLAS work on one thread.

A small matrix product or rank-1 update (well under a millisecond) loses more to waking and
waiting for BLAS worker threads than it gains, and far more when other processes hold the cores:
on the shared 2-core test machine, loops of such calls ran 10-40x slower with two OpenBLAS threads
than with one, and a whole 384x384 fast-mode prune took 0.78 s instead of 0.01 s. The solvers run
small layers, and the loops of small calls inside large ones, under `one_blas_thread()`; the
large products of large layers keep the default threads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without threadpoolctl BLAS keeps its default threads
    ThreadpoolController = None

# Floating-point operations below which a whole solve stays on one thread (~50 ms of work).
SMALL_WORK = 2**31


@cache
def _controller():
    return ThreadpoolController()


def one_blas_thread() -> AbstractContextManager:
    """Context in which BLAS libraries (numpy's and scipy's) use a single thread."""
    if ThreadpoolController is None:
        return nullcontext()
    return _controller().limit(limits=1, user_api="blas")


def blas_threads_for(flops: float) -> AbstractContextManager:
    """One BLAS thread for work under SMALL_WORK flops, the default threads above."""
    return one_blas_thread() if flops < SMALL_WORK else nullcontext()

"""Keep loops of small BLAS calls on one thread.

A small matrix product or rank-1 update (well under a millisecond of work) loses more to waking
and waiting for BLAS worker threads than it gains, and far more when other processes hold the
cores: on the shared 2-core test machine, loops of such calls ran 10-40x slower with two OpenBLAS
threads than with one. The solvers wrap those loops in `one_blas_thread()`; their large products
keep the default threads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without threadpoolctl BLAS keeps its default threads
    ThreadpoolController = None


@cache
def _controller():
    return ThreadpoolController()


def one_blas_thread() -> AbstractContextManager:
    """Context in which BLAS libraries (numpy's and scipy's) use a single thread."""
    if ThreadpoolController is None:
        return nullcontext()
    return _controller().limit(limits=1, user_api="blas")

"""Wall time per phase of a run (load, capture, Hessians, solves, validation, write)."""

from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("load", "capture", "hessians", "solves", "validation", "write")


class Phases(dict):
    """Seconds by phase name, accumulated: `with phases("capture"): ...`. A phase entered while
    another is running counts for itself only (the outer one is paused meanwhile)."""

    def __init__(self):
        super().__init__()
        self._running: list[str] = []

    @contextmanager
    def __call__(self, name: str):
        now = time.perf_counter()
        if self._running:
            outer = self._running[-1]
            self[outer] = self.get(outer, 0.0) + now - self._since
        self._running.append(name)
        self._since = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self[name] = self.get(name, 0.0) + now - self._since
            self._running.pop()
            self._since = now

    def ordered(self) -> dict[str, float]:
        """The phases in pipeline order, then any others, rounded to milliseconds."""
        names = [p for p in PHASES if p in self] + [p for p in self if p not in PHASES]
        return {p: round(self[p], 3) for p in names}

"""Progress on stderr: a bar with an ETA in a terminal, plain lines in a log.

When stderr is a terminal, each task shows a rich bar (done/total, elapsed, time left). When it
is not (a pipeline, CI, `2> log`), a task prints a plain line once it has run for `EVERY` seconds
and then at most every `EVERY` seconds, plus a last line when it ends: short runs stay silent,
long ones never go quiet for more than a few seconds. `verbose` prints a line for every step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.progress import Progress as _RichProgress

EVERY = 10.0   # seconds between plain progress lines


@dataclass
class _Task:
    description: str
    total: int | None
    start: float
    done: int = 0
    last_line: float | None = None   # when a line was last printed for it


class Progress:
    def __init__(self, enabled: bool = True, verbose: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled or verbose
        self.verbose = verbose
        self.bar = self.enabled and not verbose and self.stream.isatty()
        self._tasks: dict[int, _Task] = {}   # by rich's task id
        self._bar = _RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.stream),
            transient=True, disable=not self.bar)

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def add(self, description: str, total: int | None) -> int:
        task = self._bar.add_task(description, total=total)
        self._tasks[task] = _Task(description, total, time.perf_counter())
        if self.verbose:
            self._line(self._tasks[task], "started")
        return task

    def advance(self, task: int, by: int = 1, what: str = "") -> None:
        """`by` more steps of `task` are done; `what` names the step just finished."""
        self._bar.advance(task, by)
        t = self._tasks[task]
        t.done += by
        if not self.enabled or self.bar:
            return
        now = time.perf_counter()
        finished = t.total is not None and t.done >= t.total
        due = now - (t.last_line if t.last_line is not None else t.start) >= EVERY
        if self.verbose or due or (finished and t.last_line is not None):
            self._line(t, what, now)

    def _line(self, t: _Task, what: str, now: float | None = None) -> None:
        now = now if now is not None else time.perf_counter()
        t.last_line = now
        elapsed = now - t.start
        count = f"{t.done}/{t.total}" if t.total is not None else f"{t.done}"
        left = ""
        if t.total and 0 < t.done < t.total:
            left = f", about {elapsed / t.done * (t.total - t.done):.0f} s left"
        done = f" ({what})" if what and what != "started" else ""
        state = " started" if what == "started" else f" {count}{done}, {elapsed:.1f} s{left}"
        print(f"onnx-obs: {t.description}{state}", file=self.stream, flush=True)

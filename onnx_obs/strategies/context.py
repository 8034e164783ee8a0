"""What every strategy works on: the model being pruned, its selected sites, the data, the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from onnx_obs.calib import Calibration
from onnx_obs.config import PruneConfig
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.model_io import LoadedModel
from onnx_obs.graph.sites import Site
from onnx_obs.progress import Progress
from onnx_obs.report import Report


@dataclass
class Context:
    loaded: LoadedModel            # pruned in place
    sites: list[Site]              # the selected sites; a strategy that reshapes the graph resets it
    cal: Calibration | None
    config: PruneConfig
    report: Report
    bar: Progress
    force: bool = False            # overwrite existing output files (the gradient graph's too)
    # Hessians of the model as given, by site: shared by non-sequential calls (compare), and the
    # allocation's, which the first sequential wave reuses (nothing is pruned before it)
    hessians: dict[str, np.ndarray] | None = None
    exact: dict[str, bool] = field(default_factory=dict)  # site -> exact solver within --time-budget
    run_task: int | None = None    # the progress task of the whole run (its steps: per site and stage)
    timer: Callable[[onnx.ModelProto], float] | None = None   # ms per run; None: onnxruntime's


def run_progress(ctx: Context, stages: int) -> None:
    """Start the bar of the whole run, first: a step per site and stage (allocation, pruning), so
    that its time-left estimate covers all of it, not only the stage running now."""
    if ctx.run_task is None:
        ctx.run_task = ctx.bar.add("whole run", total=stages * len(ctx.sites))


def advance_run(ctx: Context, what: str = "") -> None:
    if ctx.run_task is not None:
        ctx.bar.advance(ctx.run_task, what=what)


def drop_uncaptureable(ctx: Context) -> None:
    """Keep the sites whose inputs can be captured (not inside subgraphs); list the rest as skipped."""
    kept = []
    for s in ctx.sites:
        if s.captureable:
            kept.append(s)
        else:
            ctx.report.skipped.append({"name": s.name, "op_type": s.op_type,
                                       "reason": "inside a subgraph: its activations cannot be "
                                                 "captured for a Hessian (use --method magnitude)"})
    if not kept:
        raise OnnxObsError("no selected site can be captured for a Hessian (all are inside "
                           "subgraphs): use --method magnitude")
    ctx.sites = kept

"""Measured sensitivity of coupling groups: the planner's curves in units of the model's output.

A group's greedy curve (strategies/structured.py) is its consumers' group-OBS error divided by
their output energy: a relative error of those layers, not of the model. How much of it reaches
the output differs from group to group (a residual stream feeds every later block; a unit
before the classifier feeds the logits directly). So, as the layer-wise allocation does
(strategies/allocation.py), each group is pruned alone, by OBS with its correction, at a few
levels, the others kept, and the model runs on up to PROBE_SAMPLES calibration samples:
    D_g(k) = sum_o ||y_o - y_o^(g,k)||^2 / ||y_o||^2     (relative output MSE, summed over outputs)
    kappa_g(k) = D_g(k) / C_g(k),   C_g(k) = the curve's first k costs summed,
and the curve's (k+1)-th cost is scaled by kappa_g interpolated linearly between the probed
levels (constant beyond them), so that the planner's cumulative costs track D_g.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnx_obs.algorithms.structured import refit_without
from onnx_obs.graph.sites import find_sites, write_matrix
from onnx_obs.graph.surgery import shrink, write_bias
from onnx_obs.metrics import relative_mse
from onnx_obs.runtime import Runner

PROBE_SAMPLES = 256             # calibration samples for the sensitivity runs
PROBE_FRACTIONS = (0.25, 0.5, 0.75)  # of a group's units removed at each probe (then rounded to its step)


def probe_counts(length: int, step: int) -> list[int]:
    """Unit counts to probe a group at: PROBE_FRACTIONS of its removable units, multiples of its
    step, increasing, none beyond the curve (`length` units may go)."""
    most = length // step * step
    counts = {min(most, max(step, step * round(f * (length + 1) / step))) for f in PROBE_FRACTIONS}
    return sorted(k for k in counts if k > 0)


def scale_curve(curve: np.ndarray, counts: list[int], measured: list[float]) -> np.ndarray:
    """The curve with its (k+1)-th cost multiplied by kappa(k+1) (module doc); kappa at a probe
    whose curve sum is 0 (units that cost nothing on the data) is taken from its neighbours, and
    the curve is left as is if no probe has a cost."""
    cum = np.cumsum(curve)
    ks, kappa = [], []
    for k, d in zip(counts, measured):
        if cum[k - 1] > 0:
            ks.append(k)
            kappa.append(d / cum[k - 1])
    if not ks:
        return curve.copy()
    return curve * np.interp(np.arange(1, len(curve) + 1), ks, kappa)


class GroupProbe:
    """Runs the model with one group pruned alone, against the original's outputs."""

    def __init__(self, loaded, cal, device: str):
        self.loaded, self.device = loaded, device
        self.batches, samples = [], 0
        for feeds in cal.batches:
            if samples >= PROBE_SAMPLES:
                break
            if cal.sliceable:
                feeds = {k: v[: PROBE_SAMPLES - samples] for k, v in feeds.items()}
                samples += len(next(iter(feeds.values())))
            else:
                samples += 1
            self.batches.append(feeds)
        runner = Runner(loaded.model, loaded.base_dir, device)
        self.reference = [runner.run(f) for f in self.batches]

    def error(self, group, consumers: list, removed, damp: float) -> float:
        """D (module doc) with the units `removed` of `group` (traced on the model as given) cut
        out and its consumers (algorithms' Consumer list, as strategies/structured._consumers
        makes it) corrected by OBS, on a copy of the model."""
        model = onnx.ModelProto()
        model.CopyFrom(self.loaded.model)
        sites = {s.name: s for s in find_sites(model)[0]}   # the copy's tensors
        for c, W in zip(group.consumers, refit_without(consumers, removed, damp)):
            if c.bias is not None:   # a copy of the slot: a bias write_bias adds is this model's only
                write_bias(model, dataclasses.replace(c.bias), W[:, -1])
                W = W[:, :-1]
            write_matrix(sites[c.site.name], W)
        shrink(model, group, removed, self.loaded.base_dir)
        runner = Runner(model, self.loaded.base_dir, self.device)
        return relative_mse(self.reference, [runner.run(f) for f in self.batches])

"""Layer-wise Hessians from calibration data: run the model, stream each site's inputs into sums.

In SparseGPT's `add_batch` idiom: `HessianCapture(loaded, sites, device)` runs one onnxruntime
session that outputs every activation the sites read; `add_batch(feeds)` turns them into input
vectors (hessian/layerwise.py) and adds them to one running sum per distinct (activation, layout,
geometry); `hessians()` returns each site's (groups, cols, cols) H = (2/n) sum x x^T. It knows
nothing of pruning.
"""

from __future__ import annotations

import numpy as np

from onnx_obs.calib import Calibration
from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.model_io import LoadedModel
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.sites import Site
from onnx_obs.hessian.layerwise import HessianSum, input_vectors
from onnx_obs.runtime import Runner


class HessianCapture:
    """with_bias: every input vector gets a trailing constant 1 (H is (groups, cols+1, cols+1)),
    the input of a bias."""

    def __init__(self, loaded: LoadedModel, sites: list[Site], device: str, with_bias: bool = False):
        self.sites, self.with_bias = sites, with_bias
        self.acts = sorted({u.activation for s in sites for u in s.uses})
        self.runner = Runner(with_outputs(loaded.model, self.acts), loaded.base_dir, device, prepack=False)
        self.sums: dict[tuple, tuple[HessianSum, Site, list]] = {}
        self.keys: dict[str, tuple] = {}
        for s in sites:  # sites reading the same activation in the same way share one sum
            geometries = [OPS[u.op_type].geometry(u.attrs, s.op_shape) for u in s.uses]
            key = tuple((u.activation, u.samples, repr(g)) for u, g in zip(s.uses, geometries))
            self.keys[s.name] = key
            if key not in self.sums:
                self.sums[key] = HessianSum(len(s.row_groups()), s.matrix_shape[1] + with_bias), s, geometries

    def add_batch(self, feeds: dict[str, np.ndarray]) -> None:
        values = dict(zip(self.acts, self.runner.run(feeds, self.acts)))
        for acc, s, geometries in self.sums.values():
            for u, geometry in zip(s.uses, geometries):
                for vectors in input_vectors(values[u.activation], u.samples, s.matrix_shape[1], geometry):
                    if self.with_bias:
                        vectors = np.concatenate([vectors, np.ones(vectors.shape[:2] + (1,), vectors.dtype)],
                                                 axis=2)
                    acc.add(vectors)

    def hessians(self) -> dict[str, np.ndarray]:
        return {s.name: self.sums[self.keys[s.name]][0].hessian() for s in self.sites}


def capture_hessians(loaded: LoadedModel, sites: list[Site], cal: Calibration, device: str,
                     bar, with_bias: bool = False) -> dict[str, np.ndarray]:
    """Run the calibration data once and return each site's (groups, cols, cols) Hessian."""
    capture = HessianCapture(loaded, sites, device, with_bias)
    task = bar.add("capturing activations", total=len(cal.batches))
    for feeds in cal:
        capture.add_batch(feeds)
        bar.advance(task)
    return capture.hessians()

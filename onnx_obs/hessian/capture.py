"""Layer-wise Hessians from calibration data: run the model, stream each site's inputs into sums.

In SparseGPT's `add_batch` idiom: `HessianCapture(loaded, sites, device)` runs one onnxruntime
session that outputs every activation the sites read; `add_batch(feeds)` turns them into input
vectors (hessian/layerwise.py) and adds them to one running sum per distinct (activation, layout,
geometry); `hessians()` returns each site's (groups, cols, cols) H = (2/n) sum x x^T. It knows
nothing of pruning. `HessianSums` is the same without the session, for activations computed
elsewhere (hessian/sequential.py runs graph slices).
"""

from __future__ import annotations

import numpy as np

from onnx_obs.calib import Calibration
from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.model_io import LoadedModel
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.sites import Site
from onnx_obs.hessian.layerwise import (
    HessianSum,
    conv_columns,
    conv_positions,
    input_vectors,
    positions_per_sample,
)
from onnx_obs.runtime import Runner
from onnx_obs.timing import Phases


class HessianSums:
    """One running sum per distinct (activation, layout, geometry) of `sites`, fed activation
    values by name. with_bias: every input vector gets a trailing constant 1 (H is
    (groups, cols+1, cols+1)), the input of a bias. max_positions: convolution output positions
    per sample (layerwise.input_vectors), 0 for all, None for positions_per_sample(cols, samples)
    of `samples` calibration samples; precision: the products' type (layerwise.PRECISIONS)."""

    def __init__(self, sites: list[Site], with_bias: bool = False, max_positions: int | None = 0,
                 precision: str = "float32", samples: int = 0):
        self.sites, self.with_bias = sites, with_bias
        self.acts = sorted({u.activation for s in sites for u in s.uses})
        self.sums: dict[tuple, tuple[HessianSum, Site, list, int]] = {}
        self.keys: dict[str, tuple] = {}
        for s in sites:  # sites reading the same activation in the same way share one sum
            geometries = [OPS[u.op_type].geometry(u.attrs, s.op_shape) for u in s.uses]
            key = tuple((u.activation, u.samples, repr(g)) for u, g in zip(s.uses, geometries))
            self.keys[s.name] = key
            if key not in self.sums:
                cols = s.matrix_shape[1] + with_bias
                limit = positions_per_sample(cols, samples) if max_positions is None else max_positions
                self.sums[key] = (HessianSum(len(s.row_groups()), cols, precision), s, geometries, limit)

    def add_values(self, values: dict[str, np.ndarray]) -> None:
        """values: every name of `acts` -> its activation for one batch."""
        for acc, s, geometries, limit in self.sums.values():
            for u, geometry in zip(s.uses, geometries):
                x = values[u.activation]
                if u.samples == "conv" and not self.with_bias:
                    positions = conv_positions(x, geometry)
                    if (not limit or positions <= limit) and positions >= acc.sum.shape[1]:
                        # all positions, with no transposing copy; where a sample has fewer
                        # positions than columns, its product (cols^2 numbers to add for
                        # positions * cols^2 products) would cost more to sum than the copy
                        # saves: the vectors of many samples go together
                        for columns in conv_columns(x, geometry):
                            acc.add_columns(columns)
                        continue
                for vectors in input_vectors(x, u.samples, s.matrix_shape[1], geometry, limit, acc.count):
                    if self.with_bias:
                        vectors = np.concatenate([vectors, np.ones(vectors.shape[:2] + (1,), vectors.dtype)],
                                                 axis=2)
                    acc.add(vectors)

    def hessians(self) -> dict[str, np.ndarray]:
        return {s.name: self.sums[self.keys[s.name]][0].hessian() for s in self.sites}


class HessianCapture(HessianSums):
    """HessianSums over one onnxruntime session of the whole model that outputs every activation
    the sites read. phases: where the run and sum times go (timing.Phases), if anywhere."""

    def __init__(self, loaded: LoadedModel, sites: list[Site], device: str, with_bias: bool = False,
                 phases: Phases | None = None, max_positions: int | None = 0, precision: str = "float32",
                 samples: int = 0):
        super().__init__(sites, with_bias, max_positions, precision, samples)
        self.phases = phases or Phases()
        with self.phases("capture"):
            # prepacked: the session runs every batch, and onnxruntime's Gemm on unpacked weights
            # rounds differently with the thread count
            self.runner = Runner(with_outputs(loaded.model, self.acts), loaded.base_dir, device)

    def add_batch(self, feeds: dict[str, np.ndarray]) -> None:
        with self.phases("capture"):
            values = dict(zip(self.acts, self.runner.run(feeds, self.acts)))
        with self.phases("hessians"):
            self.add_values(values)


def capture_hessians(loaded: LoadedModel, sites: list[Site], cal: Calibration, device: str,
                     bar, with_bias: bool = False, phases: Phases | None = None,
                     max_positions: int | None = 0, precision: str = "float32") -> dict[str, np.ndarray]:
    """Run the calibration data once and return each site's (groups, cols, cols) Hessian."""
    capture = HessianCapture(loaded, sites, device, with_bias, phases, max_positions, precision,
                             cal.num_samples)
    task = bar.add("capturing activations", total=len(cal.batches))
    for feeds in cal:
        capture.add_batch(feeds)
        bar.advance(task)
    return capture.hessians()

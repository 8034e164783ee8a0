"""Least-squares statistics of a layer against the ORIGINAL model's outputs (structured refit).

For a layer y = W x (+ b) of the model being shrunk, with x_k its input vectors there and t_k
the same layer's outputs in the original model on the same calibration samples (rows that the
layer has lost dropped), returns
    H = (2/n) sum_k x_k x_k^T,    B = (2/n) sum_k t_k x_k^T,
so that argmin_W' sum_k ||t_k - W' x_k||^2 over the columns F left is W'_F = B_F H_FF^-1
(algorithms/structured.refit_to_targets). x gets a trailing 1 with with_bias. Works for layers
whose node output is the layer's own output (Conv, Gemm, MatMul reading rows) with one use.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.sites import Site
from onnx_obs.hessian.layerwise import input_vectors
from onnx_obs.runtime import Runner


def supported(site: Site) -> bool:
    """Whether the site's node output can serve as its target: one use, plain rows or a
    convolution without groups."""
    return (len(site.uses) == 1 and site.groups == 1 and not site.uses[0].in_subgraph
            and site.uses[0].samples in ("rows", "conv"))


def output_vectors(y: np.ndarray, samples: str) -> np.ndarray:
    """A node output as (n, rows), in the order input_vectors gives the input vectors."""
    if samples == "conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def capture_targets(model: onnx.ModelProto, original: onnx.ModelProto, base_dir: str,
                    sites: list[Site], rows: dict[str, np.ndarray], with_bias: list[bool],
                    batches, device: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{site name: (H, B)} (module doc); rows[name]: the original rows the layer still has."""
    acts = sorted({s.uses[0].activation for s in sites})
    outs = sorted({s.uses[0].output for s in sites})
    now = Runner(with_outputs(model, acts), base_dir, device)
    before = Runner(with_outputs(original, outs), base_dir, device)
    sums = {s.name: None for s in sites}
    for feeds in batches:
        x = dict(zip(acts, now.run(feeds, acts)))
        t = dict(zip(outs, before.run(feeds, outs)))
        for s, bias in zip(sites, with_bias):
            u = s.uses[0]
            geometry = OPS[u.op_type].geometry(u.attrs, s.op_shape)
            target = output_vectors(np.asarray(t[u.output], dtype=np.float64), u.samples)[:, rows[s.name]]
            start = 0
            for v in input_vectors(x[u.activation], u.samples, s.matrix_shape[1], geometry):
                v = np.asarray(v[0], dtype=np.float64)
                if bias:
                    v = np.hstack([v, np.ones((len(v), 1))])
                tk = target[start:start + len(v)]
                start += len(v)
                H, B = 2.0 * v.T @ v, 2.0 * tk.T @ v
                if sums[s.name] is None:
                    sums[s.name] = [H, B, 0]
                else:
                    sums[s.name][0] += H
                    sums[s.name][1] += B
                sums[s.name][2] += len(v)
    return {name: (H / n, B / n) for name, (H, B, n) in sums.items()}

"""Finite-difference output derivatives with respect to intermediate tensors (layer outputs).

build_perturbed_model adds an input f"{name}__delta" to each chosen tensor, so a caller can move
it: full-network OBS moves layer outputs along each weight's direction (hessian/differences.py),
its fallback for graphs that build_vjp_model cannot differentiate. fd_deltas perturbs one tensor
element by element and returns central differences dF/dz: 2 runs per element of one sample, right
only where F is differentiable element by element (not at a MaxPool tie or a ReLU input within the
step of 0); the tests use it as an independent check of gradient graphs on smooth networks.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from onnx_obs.graph.grad_builder import inferred_types

__all__ = ["build_perturbed_model", "fd_deltas"]

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def build_perturbed_model(model: onnx.ModelProto, wrt: list[str]) -> onnx.ModelProto:
    """The forward model with `name` replaced by `name + delta` for each name in wrt.

    The producer's output becomes f"{name}__unperturbed" and an inserted Add produces `name` from it
    and the new input f"{name}__delta" (same type and shape as `name`, dynamic dims kept), so every
    consumer sees the perturbed value. Each wrt tensor is also appended to the graph outputs (unless
    already one), so a caller can read the values it perturbs.
    """
    types = inferred_types(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in wrt:
        if name not in producers or name not in types:
            raise ValueError(
                f"'{name}' is not a node output of the main graph with an inferred type; only those can be perturbed"
            )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    nodes = []
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        perturbed = [o for o in node.output if o in wrt]
        for name in perturbed:
            node.output[list(node.output).index(name)] = f"{name}__unperturbed"
        nodes.append(node)
        for name in perturbed:
            delta = f"{name}__delta"
            nodes.append(helper.make_node("Add", [f"{name}__unperturbed", delta], [name], name=f"{name}__perturb"))
            vi = onnx.ValueInfoProto(name=delta)
            vi.type.tensor_type.CopyFrom(types[name])
            graph.input.append(vi)
    del graph.node[:]
    graph.node.extend(nodes)
    outputs = {o.name for o in graph.output}
    for name in wrt:
        if name not in outputs:
            vi = onnx.ValueInfoProto(name=name)
            vi.type.tensor_type.CopyFrom(types[name])
            graph.output.append(vi)
    return result


class Session(Protocol):
    """What fd_deltas needs of an onnxruntime.InferenceSession."""

    def get_inputs(self) -> list: ...

    def run(self, output_names: list[str], input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def _zero_deltas(session: Session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zeros for every unfed delta input; dynamic dims get size 1 and broadcast in the Add."""
    zeros = {}
    for inp in session.get_inputs():
        if inp.name.endswith("__delta") and inp.name not in feeds:
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            zeros[inp.name] = np.zeros(shape, dtype=_ORT_FLOATS[inp.type])
    return zeros


def fd_deltas(
    session: Session, feeds: dict[str, np.ndarray], wrt: str, output: str, eps: float | None = None
) -> np.ndarray:
    """Central differences d output / d wrt for every sample, shape [batch, units, *wrt.shape[1:]].

    `session` runs build_perturbed_model(model, [..., wrt, ...]); `feeds` are the model's own inputs;
    `output` is a graph output. Axis 0 of `wrt` and `output` is the batch and samples are
    independent, so element i of every sample is perturbed in the same run; units are the flattened
    per-sample output elements. The step for element z is eps * max(1, |z|), with eps defaulting to
    cbrt(machine epsilon) of z's dtype (the optimum for central differences); the divisor uses the
    steps as actually rounded in that dtype. Returns float64.
    """
    base = {**feeds, **_zero_deltas(session, feeds)}
    y0, z = session.run([output, wrt], base)
    if eps is None:
        eps = float(np.cbrt(np.finfo(z.dtype).eps))
    batch = z.shape[0]
    steps = (eps * np.maximum(1.0, np.abs(z))).astype(z.dtype).reshape(batch, -1)
    flat_z = z.reshape(batch, -1)
    result = np.empty((batch, y0[0].size, flat_z.shape[1]))
    for i in range(flat_z.shape[1]):
        delta = np.zeros_like(flat_z)
        delta[:, i] = steps[:, i]
        y_plus = session.run([output], {**base, f"{wrt}__delta": delta.reshape(z.shape)})[0]
        y_minus = session.run([output], {**base, f"{wrt}__delta": (-delta).reshape(z.shape)})[0]
        # z + h and z - h round in z's dtype inside the Add; divide by the step actually taken.
        taken = (flat_z[:, i] + steps[:, i]).astype(np.float64) - (flat_z[:, i] - steps[:, i]).astype(np.float64)
        result[:, :, i] = (y_plus - y_minus).reshape(batch, -1).astype(np.float64) / taken[:, None]
    return result.reshape(batch, y0[0].size, *z.shape[1:])

"""Vector-Jacobian products of an ONNX graph, built as an ONNX graph that onnxruntime runs.

build_vjp_model(model, wrt, output) appends a reverse-mode pass to the forward graph: given a seed
s shaped like `output`, it returns d(sum(s * output)) / d(t) for every tensor t in `wrt`. Samples
of a batch are independent in inference graphs, so seeding one-hot e_j on every sample yields each
sample's derivative of output unit j with respect to every wrt tensor (its "delta") in one run.

Only nodes on a path from a wrt tensor to `output` are differentiated; initializers, constants and
integer tensors end the paths. Gradient rules live in grad_rules.py, their emitter in grad_builder.py.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.grad_builder import FLOAT_TYPES, GradBuilder, UnsupportedGradient, subgraph_names
from onnx_obs.graph.grad_rules import RULES

__all__ = ["UnsupportedGradient", "build_vjp_model", "supports_gradients"]

MIN_OPSET = 11


def _differentiated_nodes(b: GradBuilder, graph: onnx.GraphProto, wrt: list[str], output: str):
    """The nodes on paths from `wrt` to `output` in topological order, and the set of tensors that
    depend on `wrt` through floating-point values."""
    active = set(wrt)
    for node in graph.node:
        if active.intersection(node.input) or active & subgraph_names(node):
            active.update(o for o in node.output if o and b.is_float(o))
    needed, path = {output}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output) and (active.intersection(node.input) or active & subgraph_names(node)):
            path.append(node)
            needed.update(i for i in node.input if i in active)
    path.reverse()
    for node in path:
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise UnsupportedGradient(op, node.name or node.output[0])
    return path, active


def _total(b: GradBuilder, grads: dict[str, list[str]], name: str) -> str | None:
    """The summed gradient of `name` (tensors that fan out receive one term per consumer)."""
    terms = grads.get(name)
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = b.node("Add", [total, term])
    grads[name] = [total]
    return total


def _backward(b: GradBuilder, graph: onnx.GraphProto, wrt: list[str], output: str, seed: str) -> dict[str, str | None]:
    """Emit the reverse pass; return each wrt tensor's gradient (None where it does not reach output)."""
    path, active = _differentiated_nodes(b, graph, wrt, output)
    grads: dict[str, list[str]] = defaultdict(list)
    grads[output].append(seed)
    for node in reversed(path):
        b.current = node
        flowing = [i for i, o in enumerate(node.output) if grads.get(o)]
        if flowing != [0]:
            raise b.fail(f"gradient arrives through output {max(flowing)}; rules differentiate output 0 only")
        wanted = {i for i, name in enumerate(node.input) if name in active}
        got = RULES[node.op_type](b, node, _total(b, grads, node.output[0]), wanted)
        for i in sorted(wanted):
            if i not in got:
                raise b.fail(f"no gradient for input {i} ('{node.input[i]}')")
            grads[node.input[i]].append(got[i])
    b.current = None
    return {w: _total(b, grads, w) for w in wrt}


def _prepare(model: onnx.ModelProto, wrt: list[str], output: str) -> GradBuilder:
    b = GradBuilder(model)
    if len(set(wrt)) != len(wrt):
        raise OnnxObsError(f"wrt lists a tensor twice: {wrt}")
    for name in [*wrt, output]:
        t = b.types.get(name)
        if t is None or t.elem_type not in FLOAT_TYPES:
            raise OnnxObsError(
                f"'{name}' is not a floating-point tensor of the model's main graph (with an inferred type)"
            )
    return b


def _opset_problem(b: GradBuilder) -> str:
    if b.opset >= MIN_OPSET:
        return ""
    return (
        f"gradient graphs need opset >= {MIN_OPSET}, the model has {b.opset}; "
        "convert it with onnx.version_converter.convert_version or use finite differences"
    )


def supports_gradients(model: onnx.ModelProto, wrt: list[str], output: str) -> tuple[bool, str]:
    """Whether build_vjp_model(model, wrt, output) will succeed; if not, the reason naming the
    offending op. Runs the rules into a throwaway builder (no model is assembled), so shape- and
    attribute-dependent limits are caught as well as missing rules."""
    b = _prepare(model, wrt, output)
    if _opset_problem(b):
        return False, _opset_problem(b)
    try:
        _backward(b, model.graph, wrt, output, f"{output}__seed")
    except UnsupportedGradient as e:
        return False, str(e)
    return True, ""


def build_vjp_model(model: onnx.ModelProto, wrt: list[str], output: str) -> onnx.ModelProto:
    """The forward model plus a reverse pass.

    Inputs: the model's inputs, then f"{output}__seed" (type and shape of `output`).
    Outputs: `output`, then f"{name}__grad" for each name in wrt: d(sum(seed * output)) / d(name),
    shaped like `name`. The forward nodes, opset imports and IR version are kept as they are.
    Raises UnsupportedGradient when a node on a wrt -> output path cannot be differentiated.
    """
    b = _prepare(model, wrt, output)
    if _opset_problem(b):
        raise OnnxObsError(_opset_problem(b))
    seed = f"{output}__seed"
    grad_names = [f"{w}__grad" for w in wrt]
    for name in [seed, *grad_names]:
        if name in b.used:
            raise OnnxObsError(f"the model already has a tensor named '{name}'; rename it before differentiating")
        b.used.add(name)
    grads = _backward(b, model.graph, wrt, output, seed)
    for w, name in zip(wrt, grad_names):
        g = grads[w] or b.filled_like(w, 0.0)  # no path to output: the derivative is zero
        b.nodes.append(helper.make_node("Identity", [g], [name], name=name))

    def typed(src: str, name: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto(name=name)
        vi.type.tensor_type.CopyFrom(b.types[src])
        return vi

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.input.append(typed(output, seed))
    del graph.output[:]
    graph.output.extend([typed(output, output), *(typed(w, n) for w, n in zip(wrt, grad_names))])
    graph.node.extend(b.nodes)
    return result

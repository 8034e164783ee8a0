"""Graph cuts for capturing activations: expose intermediate tensors as graph outputs."""

from __future__ import annotations

import onnx


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are exactly `names` (intermediate tensors included).

    Dropping the original outputs lets onnxruntime skip the nodes after the last requested tensor.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    del m.graph.output[:]
    for name in dict.fromkeys(names):
        vi = m.graph.output.add()
        if name in known and known[name].type.HasField("tensor_type"):
            vi.CopyFrom(known[name])
        else:
            vi.name = name
    return m

"""The main graph as a channel trace walks it: nodes, constants, readers, inferred shapes, the
sites' nodes, and the cuts of constant tensors with the checks they need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_obs.graph.protos import attrs, constants, readers
from onnx_obs.graph.shape_fold import ShapeMath, tensor_shapes
from onnx_obs.graph.sites import Site, node_label
from onnx_obs.graph.units import Cut


class Blocked(Exception):
    """The producer's units cannot be removed; the message says why."""


class Coupled(Blocked):
    """The units meet another computed tensor elementwise (a residual Add, a gating Mul): its
    producers may join the group. `tensor` carries the channels along `axis`, where unit u must
    own `positions[u]` of its `size` channels (as in the tensor it meets)."""

    def __init__(self, message: str, tensor: str, axis: int, positions: list, size: int):
        super().__init__(message)
        self.tensor, self.axis, self.positions, self.size = tensor, axis, positions, size


class Coarsen(Blocked):
    """A Reshape splits the channel axis into blocks of `block` positions (the heads of an
    attention layer: [B, T, hidden] -> [B, T, heads, head_dim]) and the units are single
    channels: the trace starts over with units of `block` consecutive rows of the producer."""

    def __init__(self, message: str, block: int):
        super().__init__(message)
        self.block = block


@dataclass
class State:
    """Where the units lie in one tensor on the path: per unit, its positions along `axis`."""

    tensor: str
    axis: int
    positions: list[np.ndarray]
    size: int


class ChannelGraph:
    def __init__(self, model: onnx.ModelProto, sites: list[Site]):
        self.model = model
        self.nodes = list(model.graph.node)
        self.consts = constants(model.graph)
        self.readers = readers(model.graph)
        self.inner_refs = _subgraph_refs(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.shapes = tensor_shapes(model)
        self.labels = {node_label(n, i, ""): i for i, n in enumerate(self.nodes)}
        self.math = ShapeMath(self.nodes, constants(model.graph, ints=True), self.shapes)
        self.site_of_node: dict[int, list[tuple[Site, object]]] = {}
        for s in sites:
            for u in s.uses:
                if u.node in self.labels and not s.scope:
                    self.site_of_node.setdefault(self.labels[u.node], []).append((s, u))

    # ------------------------------------------------------------ tensors and nodes

    def refs(self, name: str) -> int:
        """How many node inputs of the main graph read `name`."""
        return len(self.readers.get(name, []))

    def dims(self, name: str) -> list:
        dims = self.shapes.get(name)
        if dims is None:
            raise Blocked(f"the shape of '{name}' is unknown")
        return dims

    def rank(self, name: str) -> int:
        return len(self.dims(name))

    def ints(self, name: str) -> list[int] | None:
        return self.math.ints(name)

    def only_first_output(self, ni: int) -> None:
        node = self.nodes[ni]
        for o in node.output[1:]:
            if o and (o in self.readers or o in self.outputs):
                raise Blocked(f"the extra outputs of {node.op_type} '{self.label(ni)}' are used")

    def shape_entry(self, name: str, index: int) -> tuple[str, int] | None:
        """The stored constant (and its entry) that entry `index` of the 1-D shape tensor `name`
        copies: `name` itself, or a piece of the Concat an exporter builds a target with
        (view(b, t, heads, head_dim): Shape-read dims and constants); None if it is computed."""
        if name in self.consts:
            return name, index
        ni = self.math.producer.get(name)
        if ni is None:
            return None
        node = self.nodes[ni]
        if node.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze"):   # scalar <-> [1]
            return self.shape_entry(node.input[0], index) if index == 0 else None
        if node.op_type == "Concat":
            for x in node.input:
                entries = self.math.entries(x, 0)
                if entries is None:
                    return None
                if index < len(entries):
                    return self.shape_entry(x, index)
                index -= len(entries)
        return None

    def label(self, ni: int) -> str:
        return node_label(self.nodes[ni], ni, "")

    # ------------------------------------------------------------ cuts of constants

    def per_channel(self, name: str, rank: int, axis: int, size: int,
                    positions: list[np.ndarray]) -> Cut | None:
        """The cut of a constant broadcast against a tensor whose `axis` carries the channels:
        None when it is the same for every channel (size 1 there, or no such axis)."""
        if name not in self.consts:
            raise Blocked(f"'{name}' is a computed per-channel operand")
        dims = list(self.consts[name].dims)
        k = axis - (rank - len(dims))
        if k < 0 or dims[k] == 1:
            return None
        if dims[k] != size:
            raise Blocked(f"constant '{name}' does not broadcast per channel")
        return self.own_cut(name, k, positions)

    def own_cut(self, name: str, axis: int, positions: list[np.ndarray]) -> Cut:
        if self.refs(name) != 1 or name in self.graph_inputs:
            raise Blocked(f"per-channel constant '{name}' is shared with other nodes")
        return Cut(name, axis, positions)

    def weight_cut(self, site: Site, which: str, positions: list[np.ndarray]) -> Cut:
        """The cut of a site's weight along its output ("out") or input ("in") axis; refused
        where the graph reads the size of that axis with Shape or Size."""
        axis = site.channel_axis(which)
        for ri, _ in self.readers.get(site.tensor_name, []) if not site.scope else []:
            reader = self.nodes[ri]
            if reader.op_type in ("Shape", "Size"):
                a, rank = attrs(reader), len(site.shape)
                start, end = (min(max(v + rank if v < 0 else v, 0), rank)
                              for v in (a.get("start", 0), a.get("end", rank)))
                if reader.op_type == "Size" or start <= axis < end:
                    raise Blocked(f"{reader.op_type} '{self.label(ri)}' reads the size of "
                                  f"'{site.name}' that removing units changes")
        return Cut(site.name, axis, positions)


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (they may come from the outer graph)."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for n in g.node:
                    names.update(n.input)
                names |= _subgraph_refs(g)
    return names

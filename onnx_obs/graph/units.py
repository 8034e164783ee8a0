"""What a channel trace finds (graph/tracing.py) and structured removal applies (graph/surgery.py).

A *unit* is one output row of a producer site: a Gemm / MatMul output neuron or a Conv output
channel. Channels that meet in a residual Add or a gating Mul are one unit of several producers
(a coupling group, as DepGraph calls it): unit u is row u of `producer` and the rows it meets
in the others (a Split can hand a later producer a part of the units). Its
`UnitGroup` lists what removing units changes:
  - cuts: constant tensors that lose entries along one axis when a unit goes (the producers'
    weight rows and biases, per-channel constants on the path, the consumers' weight inputs);
  - edits: integers in the graph that count channels (Reshape targets, Split sizes, the group
    of a depthwise Conv on the path);
  - consumers: each consumer site and, per unit, the columns of its 2-D view the unit feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_obs.graph.sites import Site


@dataclass
class Cut:
    tensor: str                    # constant name in the main graph
    axis: int
    positions: list[np.ndarray]    # per unit: the indices along `axis` it owns


@dataclass
class Edit:
    kind: str                      # "reshape" (entry of a shape), "split" (size), "group"
    node: int                      # index of the node in graph.node
    index: int                     # reshape: entry of `tensor`; split: output
    base: int                      # the value before any removal
    positions: list[np.ndarray]    # per unit: positions it removes from the counted axis
    tensor: str = ""               # reshape: the constant holding the entry (the target or a
                                   # piece of the Concat that computes it)


@dataclass
class BiasSlot:
    """Where a consumer's bias lives: its value in 2-D view units is scale * stored value."""

    node: int
    tensor: str | None             # None: the node has no bias yet (one is added when written)
    shape: tuple[int, ...]         # stored shape that holds one value per unit
    scale: float


@dataclass
class ConsumerUse:
    site: Site
    columns: list[np.ndarray]      # per unit: columns of the site's 2-D view it feeds
    bias: BiasSlot | None


@dataclass
class UnitGroup:
    producer: Site                 # the producer whose row u is unit u (names the group)
    node: int                      # index of the first producer's node in graph order
    units: int
    cuts: list[Cut]
    edits: list[Edit]
    consumers: list[ConsumerUse]
    path: list[str] = field(default_factory=list)   # op types followed
    producers: list[Site] = field(default_factory=list)   # all of them, the first one included
    # MatMuls of two computed tensors the units ride through on a batch axis (attention's QK^T
    # and PV): node index -> (size of that axis, per unit its positions on it); their MACs
    # shrink with them.
    batched: dict[int, tuple[int, list[np.ndarray]]] = field(default_factory=dict)


@dataclass
class LeftAlone:
    name: str
    op_type: str
    reason: str

"""What a channel trace finds (graph/tracing.py) and structured removal applies (graph/surgery.py).

A *unit* is one output row of a producer site: a Gemm / MatMul output neuron or a Conv output
channel. Its `UnitGroup` lists what removing units changes:
  - cuts: constant tensors that lose entries along one axis when a unit goes (the producer's
    weight rows and bias, per-channel constants on the path, the consumers' weight inputs);
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
    index: int                     # reshape: entry; split: output
    base: int                      # the value before any removal
    positions: list[np.ndarray]    # per unit: positions it removes from the counted axis


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
    producer: Site
    node: int                      # index of the producer node
    units: int
    cuts: list[Cut]
    edits: list[Edit]
    consumers: list[ConsumerUse]
    path: list[str] = field(default_factory=list)   # op types followed


@dataclass
class LeftAlone:
    name: str
    op_type: str
    reason: str

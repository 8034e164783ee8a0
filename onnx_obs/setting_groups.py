"""The groups of prune settings (selection, data, layer-wise, full-network, structured,
quantization) and the choices each setting takes. config.py joins them into PruneConfig and
validates them together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import Site

SCOPES = ("layer", "global")
HESSIANS = ("layerwise", "full", "fisher")
FULL_METHODS = ("obs", "obd", "magnitude")
GRADIENTS = ("auto", "graph", "fd")
AUTO_ALPHA = 0.01  # full-network alpha by default: this fraction of mean diag(H)
STRUCTURES = ("neurons", "channels")   # the same thing: "channels" is the Conv spelling
STRUCTURED_METHODS = ("obs", "magnitude")
ALLOCATIONS = ("uniform", "auto")
# Sites with fewer weights are kept dense (when larger ones exist): they save nothing, and the
# tiny linear ops of real models are often fixed transforms (a detector's 16-weight DFL
# projection, 3x3 colour matrices) that pruning breaks.
MIN_PARAMS = 64
QUANT_FORMATS = ("qdq", "matmulnbits")
ACTIVATIONS = ("none", "int8")
ACTIVATION_CALIBRATIONS = ("minmax", "percentile")


@dataclass
class Selection:
    """Which sites to prune: tensor or node names by regex, and op types."""

    include: str | None = None
    exclude: str | None = None
    op_types: list[str] | None = None
    min_params: int = MIN_PARAMS   # smaller sites stay dense (api.prune: when larger ones exist)

    def picks(self, site: Site) -> bool:
        names = [site.name] + [u.node for u in site.uses]
        if self.include and not any(self._re(self.include).search(n) for n in names):
            return False
        if self.exclude and any(self._re(self.exclude).search(n) for n in names):
            return False
        return not self.op_types or any(u.op_type in self.op_types for u in site.uses)

    def names(self, site: Site) -> bool:
        """Whether --include names the site's tensor itself (not only its node)."""
        return bool(self.include) and bool(self._re(self.include).search(site.name))

    @staticmethod
    def _re(pattern: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error as e:
            raise OnnxObsError(f"invalid regular expression '{pattern}': {e}") from e


@dataclass
class DataOptions:
    """How calibration data is read (calib.py)."""

    batch_size: int = 32           # samples per onnxruntime run
    max_samples: int | None = None
    labels: str | None = None      # key of the file holding targets (not a model input)
    batching: bool = True          # False: feed each run whole instead of slicing axis 0


@dataclass
class LayerwiseOptions:
    """Layer-wise OBS (algorithms/layerwise.py): solver, its block, damping, sequential capture."""

    solver: str = "auto"           # exact (OBC), fast (SparseGPT) or auto
    block_size: int = 128
    damp: float = 0.01             # fraction of mean diag(H) added to the diagonal
    sequential: bool = True        # capture each site's inputs after the sites before it are pruned
    capture_memory_mb: int = 2048  # sequential capture: boundary tensors held in memory, the rest on disk
    time_budget: float = 10.0      # solver="auto": modelled seconds of exact solves in a whole run
    # conv Hessians: output positions per sample (random subset); 0 = all; None = enough for
    # hessian.layerwise.VECTORS_PER_COLUMN vectors per column over the calibration set
    max_positions: int | None = None
    hessian_precision: str = "float32"  # products x^T x of float32 activations: float32 or float64 BLAS
    # "uniform": every site at the sparsity; "auto": per-site levels meeting the global target
    # (strategies/allocation.py); None: auto where it applies (PruneConfig.allocation_used)
    allocation: str | None = None
    max_layer_sparsity: float = 0.9  # auto: no site beyond this fraction of zeros


@dataclass
class FullOptions:
    """Full-network pruning (`hessian="full"` or `"fisher"`).

    alpha: H^-1_0 = alpha^-1 I of Eq. 17 (the paper: 1e-8 <= alpha <= 1e-4); None: chosen from the
        data, AUTO_ALPHA x mean diag((1/P) sum X X^T).
    max_error_increase: stop before the error increase passes this, predicted (Eq. 6) or measured
        at checkpoints during surgery (going back to the last checkpoint within it): a number
        (absolute, in units of E = 1/(2P) sum ||F - t||^2, or of the mean loss for fisher) or "N%"
        of the current error E0 (needs labels: with the model's own outputs as targets E0 is 0).
    recompute_every: rebuild H^-1 at the corrected weights after this many deletions.
    step: weights deleted together per OBS step (1 = the paper's one at a time).
    prune_biases: the biases of the selected nodes join w (the paper counts them as weights).
    gradients: "graph" (a gradient graph), "fd" (finite differences) or "auto" (graph where
        every op on the way has a rule, else fd with a note naming the op).
    save_gradient_graph: write the gradient graph (the model plus its reverse pass) here.
    """

    alpha: float | None = None
    max_error_increase: float | str | None = None
    recompute_every: int | None = None
    step: int = 1
    prune_biases: bool = False
    gradients: str = "auto"
    save_gradient_graph: str | Path | None = None

    @property
    def error_bound(self) -> tuple[str, float] | None:
        """max_error_increase parsed: ("absolute" | "relative", value), relative as a fraction."""
        spec = self.max_error_increase
        if spec is None:
            return None
        text = str(spec).strip()
        relative = text.endswith("%")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            raise OnnxObsError(f"--max-error-increase must be a number or a percentage like 5%, "
                               f"got '{spec}'") from None
        if not value >= 0:
            raise OnnxObsError(f"--max-error-increase must be non-negative, got '{spec}'")
        return ("relative", value / 100) if relative else ("absolute", value)


@dataclass
class StructureOptions:
    """Structured removal of whole units (strategies/structured.py)."""

    structure: str | None = None   # "neurons" or "channels"; None: unstructured
    target_params: int | None = None
    target_flops: float | None = None
    target_speedup: float | None = None   # MACs (or measured latency) divided by this
    target_latency_ms: float | None = None   # measured batch-1 latency to reach
    latency: str = "macs"   # what --target-speedup divides: "macs" or "measured" (latency_table.py)


@dataclass
class QuantOptions:
    """Weight quantization (strategies/quantize.py), after pruning when sparsity > 0 (zeros stay
    zeros: pruning and quantization in one pass). bits None: no quantization."""

    bits: int | None = None
    group_size: int = -1           # input channels per scale; -1: one scale per output channel
    symmetric: bool = True         # signed codes, zero point 0; False: unsigned, with zero points
    quant_method: str = "auto"     # obq, gptq, rtn, or auto (obq where affordable, else gptq)
    act_order: bool = False        # gptq: visit columns by decreasing diag H
    format: str = "qdq"            # integer initializers + DequantizeLinear, or matmulnbits
    activations: str = "none"      # int8: uint8 QDQ pairs on the sites' inputs and outputs too
    activation_calibration: str = "minmax"   # or percentile: ranges that drop the tails
    activation_percentile: float = 99.99     # percentile: the range's upper percentile of values


GROUPS = {"selection": Selection, "data": DataOptions, "layerwise": LayerwiseOptions,
          "full": FullOptions, "structured": StructureOptions, "quantize": QuantOptions}

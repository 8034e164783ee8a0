"""The network's output Hessian for full-network OBS (Hassibi & Stork 1992).

All selected weights (and, with prune_biases, the biases of their nodes) form one vector w
(`Parameters`). For every calibration sample k the derivatives X_k = dF(w, in_k)/dw of the network
outputs (Eqs. 12-14; one vector per output unit) are assembled from each linear node's deltas dF/dz
- computed by a gradient graph (graph/backprop.py) or by finite differences (graph/perturb.py) - and
its captured inputs (hessian/full.py); `FullNetwork` streams them into the Eq. 17 inverse of
H = alpha I + (1/P) sum X X^T.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_obs.calib import Calibration
from onnx_obs.config import AUTO_ALPHA, FullOptions
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.backprop import build_vjp_model, supports_gradients
from onnx_obs.graph.capture import with_outputs
from onnx_obs.graph.model_io import LoadedModel, check_output_path, save_model
from onnx_obs.graph.ops import OPS, ConvGeometry, find_bias
from onnx_obs.graph.perturb import build_perturbed_model
from onnx_obs.graph.protos import NUMPY_FLOAT_TYPES, constants, readers
from onnx_obs.graph.sites import Site, Use, site_matrix, write_matrix
from onnx_obs.hessian import full as fullh
from onnx_obs.hessian.differences import NodeTerm, weight_jacobian
from onnx_obs.hessian.inverse import available_memory, inverse_hessian
from onnx_obs.hessian.layerwise import input_vectors
from onnx_obs.runtime import Runner

_FLAT_ALPHA = 1e-6  # alpha where diag H is 0 (the paper's middle value)
_KEEP_BYTES = 2**30  # derivative vectors kept in memory between the alpha pass and the inverse
_STACK_ROWS = 512  # finite differences: samples per stacked run

# ---- the weight vector -------------------------------------------------------------------------


@dataclass
class Segment:
    """A slice of w: one site's 2-D matrix (row-major) or one node's bias."""

    name: str
    op: str
    start: int
    shape: tuple[int, ...]  # the site's matrix shape, or the bias tensor's shape
    site: Site | None = None
    bias: onnx.TensorProto | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.size)


@dataclass
class Term:
    """One linear node's contribution to X: its weight segment, its bias segment (if any)."""

    site: Site
    use: Use
    weights: slice
    layout: str  # of the node output, see hessian.full.delta_vectors
    alpha: float
    geometry: ConvGeometry | None
    bias: slice | None = None
    beta: float = 1.0


@dataclass
class Parameters:
    segments: list[Segment]
    terms: list[Term]
    base_dir: str
    n: int = field(init=False)

    def __post_init__(self):
        self.n = sum(s.size for s in self.segments)

    def read(self) -> np.ndarray:
        parts = []
        for s in self.segments:
            if s.site is not None:
                parts.append(site_matrix(s.site, self.base_dir).ravel())
            else:
                parts.append(numpy_helper.to_array(s.bias, self.base_dir).astype(np.float64).ravel())
        return np.concatenate(parts)

    def write(self, w: np.ndarray) -> None:
        for s in self.segments:
            if s.site is not None:
                write_matrix(s.site, w[s.slice].reshape(s.shape))
            else:
                dtype = helper.tensor_dtype_to_np_dtype(s.bias.data_type)
                s.bias.CopyFrom(numpy_helper.from_array(w[s.slice].reshape(s.shape).astype(dtype), s.bias.name))


def parameters(model: onnx.ModelProto, sites: list[Site], base_dir: str, prune_biases: bool,
               notes: list[str]) -> Parameters:
    """Lay out w: every site's matrix, then (with prune_biases) each of their nodes' biases."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    read = readers(graph)
    inits = constants(graph, nodes=False)
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    segments, terms, start = [], [], 0
    for s in sites:
        segments.append(Segment(s.name, s.op_type, start, s.matrix_shape, site=s))
        start += segments[-1].size
    for s, seg in zip(sites, list(segments)):
        for u in s.uses:
            ni, spec = producer[u.output], OPS[u.op_type]
            layout = spec.units(graph.node[ni], u.activation)
            alpha, beta = spec.scales(u.attrs)
            term = Term(s, u, seg.slice, layout, alpha, spec.geometry(u.attrs, s.op_shape))
            terms.append(term)
            if not prune_biases:
                continue
            bias = _bias(graph.node, ni, layout, s.matrix_shape[0], read, inits, graph_inputs, graph_outputs)
            if isinstance(bias, str):
                notes.append(f"bias of {u.node} left out of w: {bias}")
                continue
            if bias is None:
                continue
            segments.append(Segment(bias.name, f"{u.op_type} bias", start, tuple(bias.dims), bias=bias))
            term.bias, term.beta = segments[-1].slice, beta
            start += segments[-1].size
    return Parameters(segments, terms, base_dir)


def _bias(nodes, index: int, layout: str, rows: int, read, inits, graph_inputs, graph_outputs):
    """The per-unit bias tensor of node `index`, None if it has none, or why it cannot join w.
    A MatMul's bias is an Add of a constant after it: the delta of the MatMul output is the bias's,
    unless that output is also a graph output (the bias does not reach that output)."""
    found = find_bias(nodes, index, read)
    if found is None or found.name is None or (found.added and found.name not in inits):
        return None
    name = found.name
    if found.added and nodes[index].output[0] in graph_outputs:
        return f"'{name}' is added after '{nodes[index].output[0]}', which is also a graph output"
    tensor = inits.get(name)
    if tensor is None or name in graph_inputs:
        return f"'{name}' is not a constant initializer of the main graph"
    if tensor.data_type not in NUMPY_FLOAT_TYPES:
        return f"'{name}' has an unsupported data type"
    if len(read.get(name, [])) != 1:
        return f"'{name}' is shared with other nodes"
    dims = list(tensor.dims)
    if layout == "rows":
        aligned = bool(dims) and dims[-1] == rows
    elif layout == "cols":
        aligned = len(dims) >= 2 and dims[-2] == rows and dims[-1] == 1
    else:
        aligned = dims == [rows]
    if not aligned or int(np.prod(dims)) != rows:
        return f"'{name}' of shape {dims} is not one value per output unit"
    return tensor


# ---- derivatives ---------------------------------------------------------------------------------


class _GraphDeltas:
    """dF/dz for every linear node output z, by a gradient graph per output (graph/backprop.py)."""

    def __init__(self, model: onnx.ModelProto, base_dir: str, wrt: list[str], outputs: list[str], device: str):
        self.wrt = wrt
        self.models = {o: build_vjp_model(model, wrt, o) for o in outputs}
        self.runners = {o: Runner(m, base_dir, device) for o, m in self.models.items()}

    def __call__(self, feeds: dict, seeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """seeds: per output, (S, *output shape). Returns per z: (sum of S, *z shape), the derivative
        of sum(seed * output) for each seed."""
        parts: dict[str, list[np.ndarray]] = {z: [] for z in self.wrt}
        grads = [f"{z}__grad" for z in self.wrt]
        for out, s in seeds.items():
            runs = [self.runners[out].run({**feeds, f"{out}__seed": seed}, grads) for seed in s]
            for k, z in enumerate(self.wrt):
                parts[z].append(np.stack([r[k] for r in runs]).astype(np.float64))
        return {z: np.concatenate(p) for z, p in parts.items()}


class _WeightDifferences:
    """dF/dw for every sample by central differences along the weights (hessian/differences.py),
    through the model with an added input per linear node output z (graph/perturb.py). Where the
    inputs are batched on axis 0, the moves of several weights run as one stacked batch (the
    calibration batch repeated), checked once against the unmoved outputs."""

    def __init__(self, model: onnx.ModelProto, base_dir: str, wrt: list[str], outputs: list[str], device: str,
                 stackable: bool):
        self.wrt, self.outputs = wrt, outputs
        self.runner = Runner(build_perturbed_model(model, wrt), base_dir, device)
        fixed = any(isinstance(i.shape[0] if i.shape else 1, int) for i in self.runner.session.get_inputs()
                    if not i.name.endswith("__delta"))
        self.stack = stackable and not fixed
        self.redone = self.kinks = 0

    def _run(self, feeds: dict, zeros: dict, moves: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Outputs (len(moves), B, U) for the batch with each set of moves, in one run."""
        t = len(moves)
        tiled = {k: np.concatenate([v] * t) for k, v in feeds.items()} if t > 1 else feeds
        deltas = {f"{z}__delta": np.concatenate([m[z].astype(zero.dtype) if z in m else zero for m in moves])
                  for z, zero in zeros.items()}
        outs = self.runner.run({**tiled, **deltas}, self.outputs)
        return np.concatenate([o.reshape(t, len(o) // t, -1).astype(np.float64) for o in outs], axis=2)

    def __call__(self, feeds: dict, w: np.ndarray, terms: list[NodeTerm], values: dict) -> np.ndarray:
        """J (B, U, n): every output unit of every sample (outputs in order) against every weight."""
        zeros = {z: np.zeros_like(values[z]) for z in self.wrt}  # full shape: onnxruntime fuses Conv + Add
        # and will not broadcast
        y0 = self._run(feeds, zeros, [{}])[0]
        per_run = max(1, _STACK_ROWS // len(y0)) if self.stack else 1
        if per_run > 1 and not self._stacks(feeds, zeros, y0):
            self.stack, per_run = False, 1

        def run(moves: list[dict[str, np.ndarray]]) -> np.ndarray:
            return np.concatenate([self._run(feeds, zeros, moves[i:i + per_run])
                                   for i in range(0, len(moves), per_run)])

        z_eps = max(float(np.finfo(values[z].dtype).eps) for z in self.wrt)
        out_eps = max(float(np.finfo(values[o].dtype).eps) for o in self.outputs)
        J, redone, kinks = weight_jacobian(run, y0, w, terms, float(np.cbrt(z_eps)), out_eps)
        self.redone += redone
        self.kinks += kinks
        return J

    def _stacks(self, feeds: dict, zeros: dict, y0: np.ndarray) -> bool:
        """Whether the model runs a repeated batch sample by sample (no batch size baked into a Reshape)."""
        try:
            y = self._run(feeds, zeros, [{}, {}])
        except OnnxObsError:
            return False
        return y.shape[1:] == y0.shape and bool(np.all(y == y0))


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    outs = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in NUMPY_FLOAT_TYPES]
    if not outs:
        raise OnnxObsError("the model has no floating-point output to differentiate")
    return outs


class FullNetwork:
    """The network F(w, in) over the calibration data: targets, error, and per-sample derivatives.

    hessian "full": X_k holds dF_u/dw for every output unit u (Gauss-Newton H of
    E = 1/(2P) sum_k ||F_k - t_k||^2, exact at w0 when the targets are the model's own outputs).
    hessian "fisher": one vector per sample, the gradient of its loss (softmax cross-entropy for
    class scores with class labels, 1/2 ||F - t||^2 otherwise): the empirical Fisher.
    """

    def __init__(self, loaded: LoadedModel, params: Parameters, cal: Calibration, *, hessian: str,
                 options: FullOptions, device: str, notes: list[str], force: bool = False):
        self.loaded, self.params, self.cal, self.device = loaded, params, cal, device
        self.options, self.notes, self.force = options, notes, force
        self.fisher = hessian == "fisher"
        self.outputs = _float_outputs(loaded.model)
        self.wrt = list(dict.fromkeys(t.use.output for t in params.terms))
        self.acts = list(dict.fromkeys(t.use.activation for t in params.terms))
        self.P = 0  # samples: the rows of the outputs, whatever the inputs' layout
        self.mode: str | None = None
        self.seconds = {"gradients": 0.0, "inverse": 0.0}
        self.mean_diag: float | None = None
        self.rows_per_sample = 0
        self.recomputes = 0
        self.gradient_graphs: dict[str, onnx.ModelProto] = {}
        self.differences: _WeightDifferences | None = None
        self.alpha = options.alpha  # None: chosen from the data by the first inverse()
        self.checkpoints = None  # the strategy's record of measured errors during surgery
        self.output_energy = 0.0  # 1/(2P) sum ||t||^2: the scale of E
        self.fd_reason: str | None = None
        self._reference(cal.labels)

    # -- targets and error
    def _reference(self, labels) -> None:
        if labels is not None and len(self.outputs) != 1:
            raise OnnxObsError(f"--labels needs a model with one output, this one has {len(self.outputs)}: "
                               f"{', '.join(self.outputs)}")
        runner = Runner(with_outputs(self.loaded.model, self.outputs), self.loaded.base_dir, self.device)
        self.targets, start = [], 0
        for feeds in self.cal:
            outs = runner.run(feeds, self.outputs)
            b = outs[0].shape[0] if outs[0].ndim else 0
            for name, f in zip(self.outputs, outs):
                if f.ndim == 0 or f.shape[0] != b:
                    raise OnnxObsError(f"output '{name}' of shape {list(f.shape)} does not have the batch of {b} "
                                       "on axis 0: full-network OBS needs per-sample outputs")
            self.P += b
            self.output_energy += sum(fullh.squared_error(o, 0.0) for o in outs)
            if labels is None:
                self.targets.append([o.astype(np.float64) for o in outs])
                continue
            try:
                self.targets.append([fullh.target_array(labels[start:start + b], outs[0])])
            except ValueError as e:
                raise OnnxObsError(f"--labels: {e}") from e
            start += b
        self.classifier = self.fisher and fullh.is_classifier(outs[0], np.asarray(labels))
        if self.fisher:
            loss = "softmax cross-entropy" if self.classifier else "squared error 1/2 ||F - t||^2"
            self.notes.append(f"empirical Fisher: per-sample gradients of the {loss} against the labels")
        self.output_energy /= self.P
        self.E0 = self.error()

    def error(self) -> float:
        """E at the current weights: 1/(2P) sum ||F - t||^2 (fisher: the mean loss)."""
        runner = Runner(with_outputs(self.loaded.model, self.outputs), self.loaded.base_dir, self.device)
        total = 0.0
        for feeds, targets in zip(self.cal, self.targets):
            for f, t in zip(runner.run(feeds, self.outputs), targets):
                total += fullh.cross_entropy(f, t) if self.classifier else fullh.squared_error(f, t)
        return total / self.P

    # -- derivatives
    def _mode(self) -> str:
        if self.mode is None:
            if self.options.gradients == "fd":
                self.fd_reason = "--gradients fd"
            self.mode = "fd" if self.options.gradients == "fd" else self._graph_or_fd()
        return self.mode

    def _graph_or_fd(self) -> str:
        for out in self.outputs:
            ok, reason = supports_gradients(self.loaded.model, self.wrt, out)
            if ok:
                continue
            reason = reason.split("; use finite differences")[0]
            if self.options.gradients == "graph":
                raise OnnxObsError(f"--gradients graph: {reason}; use --gradients fd (finite differences)")
            self.fd_reason = f"no gradient graph: {reason}"
            self.notes.append(f"gradients by finite differences: no gradient graph ({reason})")
            return "fd"
        return "graph"

    def _source(self) -> _GraphDeltas | _WeightDifferences:
        if self._mode() == "fd":
            if self.differences is None:
                self.differences = _WeightDifferences(self.loaded.model, self.loaded.base_dir, self.wrt,
                                                      self.outputs, self.device, self.cal.sliceable)
            return self.differences
        deltas = _GraphDeltas(self.loaded.model, self.loaded.base_dir, self.wrt, self.outputs, self.device)
        if self.options.save_gradient_graph is not None and not self.gradient_graphs:
            self.gradient_graphs = deltas.models  # at the original weights
        return deltas

    def save_gradient_graphs(self, path: str | Path) -> None:
        """Write the gradient graph (one file per output: PATH, then PATH with the output name)."""
        path = Path(path)
        if not self.gradient_graphs:
            self.notes.append(f"no gradient graph written to {path}: the gradients came from finite differences")
        for k, (out, m) in enumerate(self.gradient_graphs.items()):
            target = path if k == 0 else check_output_path(path.with_name(f"{path.stem}.{out}{path.suffix}"),
                                                            None, self.force)
            save_model(m, target, self.loaded.base_dir)
            self.notes.append(f"gradient graph of output '{out}' written to {target}")

    def _seeds(self, outs: list[np.ndarray], targets: list[np.ndarray]) -> dict[str, np.ndarray]:
        if self.fisher:
            g = fullh.loss_gradient(outs[0], targets[0], self.classifier)
            return {self.outputs[0]: g[None].astype(outs[0].dtype)}
        seeds = {}
        for name, f in zip(self.outputs, outs):
            b, units = f.shape[0], f[0].size
            onehot = np.broadcast_to(np.eye(units, dtype=f.dtype)[:, None, :], (units, b, units))
            seeds[name] = onehot.reshape(units, *f.shape)
        return seeds

    def _batch(self, source, forward: Runner, feeds: dict, targets, w: np.ndarray) -> np.ndarray:
        """X for one batch: (B, S, n), S vectors per sample."""
        names = list(dict.fromkeys(self.outputs + self.acts + self.wrt))
        values = dict(zip(names, forward.run(feeds, names)))
        outs = [values[o] for o in self.outputs]
        b = outs[0].shape[0]
        for t in self.params.terms:
            _check_batch_axis(t, values[t.use.activation], values[t.use.output].shape, b, self.mode)
        seeds = self._seeds(outs, targets)
        if isinstance(source, _WeightDifferences):
            return self._seeded(source(feeds, w, self._node_terms(values), values), seeds, outs)
        d = source(feeds, seeds)
        s = next(iter(d.values())).shape[0]
        X = np.zeros((b, s, self.params.n))
        for t in self.params.terms:
            rows, cols = t.site.matrix_shape
            dv = fullh.delta_vectors(d[t.use.output], t.layout, rows, t.site.groups if t.layout == "channels" else 1)
            xv = np.concatenate(list(input_vectors(values[t.use.activation], t.use.samples, cols, t.geometry)), axis=1)
            X[:, :, t.weights] += fullh.weight_derivatives(dv, xv, b, t.alpha)
            if t.bias is not None:
                X[:, :, t.bias] += fullh.bias_derivatives(dv, b, t.beta)
        return X

    def _node_terms(self, values: dict) -> list[NodeTerm]:
        terms = []
        for t in self.params.terms:
            rows, cols = t.site.matrix_shape
            xv = np.concatenate(list(input_vectors(values[t.use.activation], t.use.samples, cols, t.geometry)), axis=1)
            terms.append(NodeTerm(t.use.output, values[t.use.output].shape, t.layout, rows,
                                  t.site.groups if t.layout == "channels" else 1, xv, t.weights, t.alpha,
                                  t.bias, t.beta))
        return terms

    @staticmethod
    def _seeded(J: np.ndarray, seeds: dict[str, np.ndarray], outs: list[np.ndarray]) -> np.ndarray:
        """X[b, s, j] = sum_u seed_s[b, u] J[b, u, j], the seeds of each output in turn."""
        parts, start = [], 0
        for f, s in zip(outs, seeds.values()):
            units = f[0].size
            S = s.reshape(len(s), len(f), units).astype(np.float64)
            parts.append(np.einsum("sbu,buj->bsj", S, J[:, start:start + units]))
            start += units
        return np.concatenate(parts, axis=1)

    def derivative_blocks(self, keep: np.ndarray | None = None, bar=None):
        """Stream X over the calibration data at the current weights, one (B * S, n) block per batch
        (columns restricted to `keep`)."""
        t0 = time.perf_counter()
        deltas = self._source()
        w = self.params.read()
        names = list(dict.fromkeys(self.outputs + self.acts + self.wrt))
        forward = Runner(with_outputs(self.loaded.model, names), self.loaded.base_dir, self.device)
        self.seconds["gradients"] += time.perf_counter() - t0
        task = bar.add("full-network gradients", total=len(self.cal.batches)) if bar else None
        for feeds, targets in zip(self.cal, self.targets):
            t0 = time.perf_counter()
            X = self._batch(deltas, forward, feeds, targets, w)
            self.rows_per_sample = X.shape[1]
            X = X.reshape(-1, self.params.n)
            if keep is not None:
                X = X[:, keep]
            self.seconds["gradients"] += time.perf_counter() - t0
            if task is not None:
                bar.advance(task)
            yield X

    def hessian_diag(self, keep: np.ndarray | None = None, bar=None) -> np.ndarray:
        """diag(H) = (1/P) sum X_k^2, without forming H."""
        diag = np.zeros(self.params.n if keep is None else keep.size)
        for X in self.derivative_blocks(keep, bar):
            diag += np.einsum("ij,ij->j", X, X)
        diag /= self.P
        self.mean_diag = float(diag.mean())
        return diag

    def inverse(self, keep: np.ndarray | None = None, bar=None) -> np.ndarray:
        """H^-1 = (alpha I + (1/P) sum X X^T)^-1 by Eq. 17, blocked (hessian/inverse.py). Without a
        given alpha, the first call sets it to AUTO_ALPHA x mean diag((1/P) sum X X^T) from a first
        pass over the derivative vectors (kept in memory when they fit, else computed again)."""
        m = self.params.n if keep is None else keep.size
        sq = np.zeros(m)

        def counted(blocks):
            for X in blocks:
                sq[:] += np.einsum("ij,ij->j", X, X)
                yield X

        blocks = counted(self.derivative_blocks(keep, bar))
        if self.alpha is None:
            kept, budget = [], min(_KEEP_BYTES, available_memory() // 4)
            for X in blocks:
                budget -= X.nbytes
                if budget < 0:
                    kept = None
                elif kept is not None:
                    kept.append(X)
            self.alpha = AUTO_ALPHA * float(sq.mean() / self.P)
            if not self.alpha > 0:
                self.alpha = _FLAT_ALPHA
                self.notes.append(f"diag H is 0: the outputs do not depend on the selected weights on the calibration "
                                  f"data (saturated units?); alpha {_FLAT_ALPHA:g}")
            sq[:] = 0.0
            blocks = counted(iter(kept) if kept is not None else self.derivative_blocks(keep, bar))
        t0, g0 = time.perf_counter(), self.seconds["gradients"]
        Hinv = inverse_hessian(blocks, m, self.alpha, self.P)
        self.seconds["inverse"] += time.perf_counter() - t0 - (self.seconds["gradients"] - g0)
        self.mean_diag = float(sq.mean() / self.P)
        return Hinv

    def recompute(self, w: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """H^-1 over the kept weights at the corrected weights w (obs_surgery's callback)."""
        self.params.write(w)
        self.recomputes += 1
        return self.inverse(np.flatnonzero(mask))


def _check_batch_axis(t: Term, x: np.ndarray, z_shape: tuple, batch: int, mode: str) -> None:
    """Samples must own contiguous runs of positions: the batch is the first non-feature axis."""
    x_axis = x.shape[-1] if t.use.samples == "cols" and x.ndim == 2 else (x.shape[0] if x.ndim else 0)
    z_axis = z_shape[-1] if t.layout == "cols" and len(z_shape) == 2 else (z_shape[0] if z_shape else 0)
    if mode == "fd" and (z_shape[0] if z_shape else 0) != batch:
        raise OnnxObsError(f"finite differences need the batch on axis 0 of '{t.use.output}' "
                           f"(shape {list(z_shape)}): use --gradients graph")
    if batch > 1 and (x_axis != batch or z_axis != batch):
        raise OnnxObsError(f"node {t.use.node}: the samples of a batch do not lead its input or output "
                           "tensor, so their derivatives cannot be told apart: pass --batch-size 1")

"""Properties of every pruning mode on random MLPs and CNNs with random calibration data.

Random graphs (Gemm with transB 0/1 or MatMul with an optional Add bias, Relu/Tanh/Sigmoid or no
activation, Conv with random kernels, pads, strides, dilations and groups, then Flatten and a dense
head) are pruned in-process with api.prune, some sites excluded at random. For every method the
written model must pass onnx.checker (full check), run in onnxruntime with the original's output
names, shapes and dtypes, hold no NaN/Inf, and leave the input file and every tensor it should not
touch byte-identical; unstructured modes must reach the requested sparsity (or N:M pattern) on
every selected site, structured modes must remove the requested units and never add parameters.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from graphs import conv_model, init, make_model, run, vi
from onnx_obs import api
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import find_sites
from onnx_obs.graph.tracing import trace_units

ACTS = (None, "Relu", "Tanh", "Sigmoid")
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True)


# ---------------------------------------------------------------- graph specifications

@dataclass(frozen=True)
class Dense:
    op: str            # "Gemm" or "MatMul"
    width: int
    trans_b: int       # Gemm only: weight stored [out, in]
    bias: bool         # Gemm: input C; MatMul: a following Add
    act: str | None


@dataclass(frozen=True)
class Conv:
    c_out: int
    kernel: tuple[int, int]
    pads: tuple[int, int, int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    group: int
    bias: bool
    act: str | None


@dataclass(frozen=True)
class Net:
    input_shape: tuple[int, ...]   # without the batch axis
    convs: tuple[Conv, ...]
    dense: tuple[Dense, ...]
    seed: int
    zero_fraction: float           # weights that are exactly zero before pruning

    @property
    def layers(self) -> tuple:
        return self.convs + self.dense


def dense_layers(max_layers: int = 3, max_width: int = 12):
    layer = st.builds(Dense, op=st.sampled_from(["Gemm", "MatMul"]), width=st.integers(1, max_width),
                      trans_b=st.integers(0, 1), bias=st.booleans(), act=st.sampled_from(ACTS))
    return st.lists(layer, min_size=1, max_size=max_layers).map(tuple)


def weight_values():
    return dict(seed=st.integers(0, 2**16), zero_fraction=st.sampled_from([0.0, 0.0, 0.3]))


@st.composite
def mlps(draw, max_layers: int = 3, max_width: int = 12) -> Net:
    return Net(input_shape=(draw(st.integers(1, 12)),), convs=(), dense=draw(dense_layers(max_layers, max_width)),
               **draw(st.fixed_dictionaries(weight_values())))


@st.composite
def conv_layer(draw, channels: int, spatial: tuple[int, int]) -> tuple[Conv, tuple[int, int]]:
    """A Conv valid on [channels, *spatial] inputs, and its output spatial size."""
    group = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    c_out = group * draw(st.integers(1, max(1, 6 // group)))
    kernel, pads, strides, dilations, out = [], [0, 0, 0, 0], [], [], []
    for axis, size in enumerate(spatial):
        k, d, s = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        begin, end = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        padded = size + begin + end
        if d * (k - 1) + 1 > padded:  # the kernel must fit: shrink it, then its dilation
            d = 1
            k = min(k, padded)
        pads[axis], pads[axis + 2] = begin, end
        kernel.append(k), strides.append(s), dilations.append(d)
        out.append((padded - d * (k - 1) - 1) // s + 1)
    conv = Conv(c_out, tuple(kernel), tuple(pads), tuple(strides), tuple(dilations), group,
                draw(st.booleans()), draw(st.sampled_from(ACTS)))
    return conv, tuple(out)


@st.composite
def cnns(draw) -> Net:
    channels = draw(st.integers(1, 4))
    spatial = (draw(st.integers(2, 6)), draw(st.integers(2, 6)))
    shape, convs = (channels, *spatial), []
    for _ in range(draw(st.integers(1, 2))):
        conv, spatial = draw(conv_layer(channels, spatial))
        convs.append(conv)
        channels = conv.c_out
    return Net(input_shape=shape, convs=tuple(convs), dense=draw(dense_layers(2, 6)),
               **draw(st.fixed_dictionaries(weight_values())))


nets = st.one_of(mlps(), cnns())


# ---------------------------------------------------------------- building and running

def weight_shape(layer, fan_in: int) -> tuple[int, ...]:
    if isinstance(layer, Conv):
        return (layer.c_out, fan_in // layer.group, *layer.kernel)
    if layer.op == "Gemm" and layer.trans_b:
        return (layer.width, fan_in)
    return (fan_in, layer.width)


def as_matrix(layer, w: np.ndarray) -> np.ndarray:
    """The 2-D view (rows = output units, columns = inputs), written out here independently of
    onnx_obs.graph.sites: N:M groups run along its columns."""
    if isinstance(layer, Conv):
        return w.reshape(w.shape[0], -1)
    return w if layer.op == "Gemm" and layer.trans_b else w.T


def build(net: Net) -> onnx.ModelProto:
    """x [batch, *input_shape] -> convs -> Flatten -> dense layers -> y. Layer i is node "layer{i}"
    with weight "w{i}" and bias "b{i}"."""
    rng = np.random.default_rng(net.seed)
    nodes, inits, prev, fan_in = [], [], "x", net.input_shape[0]
    for i, layer in enumerate(net.layers):
        if i == len(net.convs) and net.convs:
            nodes.append(helper.make_node("Flatten", [prev], ["flat"], name="flatten"))
            prev, fan_in = "flat", flat_size(nodes, inits, net)
        w = rng.standard_normal(weight_shape(layer, fan_in)).astype(np.float32)
        w[rng.random(w.shape) < net.zero_fraction] = 0.0
        width = layer.c_out if isinstance(layer, Conv) else layer.width
        b = rng.standard_normal(width).astype(np.float32)
        inits.append(init(f"w{i}", w))
        ins, out = [prev, f"w{i}"], f"z{i}"
        if isinstance(layer, Conv):
            attrs = dict(kernel_shape=list(layer.kernel), pads=list(layer.pads), strides=list(layer.strides),
                         dilations=list(layer.dilations), group=layer.group)
        else:
            attrs = dict(transB=layer.trans_b) if layer.op == "Gemm" else {}
        if layer.bias and (isinstance(layer, Conv) or layer.op == "Gemm"):
            inits.append(init(f"b{i}", b))
            ins.append(f"b{i}")
        nodes.append(helper.make_node("Conv" if isinstance(layer, Conv) else layer.op, ins, [out],
                                      name=f"layer{i}", **attrs))
        if isinstance(layer, Dense) and layer.op == "MatMul" and layer.bias:
            inits.append(init(f"b{i}", b))
            nodes.append(helper.make_node("Add", [out, f"b{i}"], [out + "b"], name=f"add{i}"))
            out += "b"
        if layer.act:
            nodes.append(helper.make_node(layer.act, [out], [out + "a"], name=f"act{i}"))
            out += "a"
        prev, fan_in = out, width
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="output"))
    return make_model(nodes, [vi("x", np.float32, ["batch", *net.input_shape])],
                      [vi("y", np.float32, ["batch", net.dense[-1].width])], inits)


def flat_size(nodes, inits, net: Net) -> int:
    m = make_model(nodes, [vi("x", np.float32, ["batch", *net.input_shape])],
                   [vi("flat", np.float32, None)], inits)
    return m.graph.output[0].type.tensor_type.shape.dim[1].dim_value


def calibration(net: Net, samples: int, scale: float, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((samples, *net.input_shape)) * scale
    return {"x": x.astype(np.float32)}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


@dataclass(frozen=True)
class Case:
    net: Net
    excluded: tuple[int, ...]   # layers left out of the selection
    by_include: bool            # select with include (the others) rather than exclude
    calib: dict[str, np.ndarray]
    batch_size: int

    @property
    def selected(self) -> list[int]:
        return [i for i in range(len(self.net.layers)) if i not in self.excluded]

    def selection(self) -> api.Selection:
        # min_params=0: these random layers are tiny; the --min-params safeguard is tested apart
        names = self.selected if self.by_include else self.excluded
        if not names:
            return api.Selection(min_params=0)
        pattern = "^(" + "|".join(f"w{i}" for i in names) + ")$"
        return (api.Selection(include=pattern, min_params=0) if self.by_include
                else api.Selection(exclude=pattern, min_params=0))


@st.composite
def cases(draw, net_strategy=nets) -> Case:
    net = draw(net_strategy)
    n = len(net.layers)
    excluded = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1))
    calib = calibration(net, draw(st.integers(1, 8)), draw(st.sampled_from([1.0, 1e-3, 1e3])),
                        draw(st.integers(0, 2**16)))
    return Case(net, tuple(sorted(excluded)), draw(st.booleans()), calib, draw(st.integers(1, 4)))


@dataclass
class Outcome:
    case: Case
    original: onnx.ModelProto
    pruned: onnx.ModelProto
    report: object


def prune_written(case: Case, **kw) -> Outcome:
    """Build, save and prune the case's net with api.prune, then check the properties every mode
    shares: the input file untouched, the written file fully checked, onnxruntime outputs of the
    original's names, shapes and dtypes, no NaN/Inf anywhere."""
    original = build(case.net)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(original, str(src))
        before = src.read_bytes()
        result = api.prune(str(src), case.calib, selection=case.selection(), output=dst,
                           batch_size=case.batch_size, **kw)
        assert src.read_bytes() == before
        pruned = onnx.load(str(dst))
    onnx.checker.check_model(pruned, full_check=True)
    want, got = run(original, case.calib), run(pruned, case.calib)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
        assert np.isfinite(got[name]).all()
    for name, w in weights(pruned).items():
        assert np.isfinite(w).all(), name
    return Outcome(case, original, pruned, result.report)


def untouched_identical(before: dict[str, bytes], after: dict[str, bytes], touched: set[str]) -> None:
    changed = {n for n in before if after.get(n) != before[n]} - touched
    assert not changed, f"tensors changed that should not have: {sorted(changed)}"


# ---------------------------------------------------------------- unstructured, layer-wise

UNSTRUCTURED = [
    ("magnitude", "auto"), ("obs", "exact"), ("obs", "fast"), ("obd", "auto"), ("wanda", "auto"),
]
# Small blocks make the fast solver cross block boundaries inside these narrow layers.
layerwise_options = st.fixed_dictionaries(dict(block_size=st.integers(1, 16), sequential=st.booleans()))


def check_unstructured(out: Outcome, sparsity: float | None, pattern: tuple[int, int] | None) -> None:
    before, after = weights(out.original), weights(out.pruned)
    assert [n.SerializeToString() for n in out.pruned.graph.node] == \
        [n.SerializeToString() for n in out.original.graph.node]
    untouched_identical(tensors(out.original), tensors(out.pruned), {f"w{i}" for i in out.case.selected})
    zeros_after = {r.name: r.zeros_after for r in out.report.sites}
    for i in out.case.selected:
        layer, w0, w = out.case.net.layers[i], before[f"w{i}"], after[f"w{i}"]
        assert w.shape == w0.shape and w.dtype == w0.dtype
        assert np.all(w[w0 == 0] == 0), f"w{i}: a weight that was zero is not zero any more"
        zeros = int(np.sum(w == 0))
        assert zeros_after[f"w{i}"] == zeros
        if pattern is None:
            assert zeros >= round(sparsity * w.size), (f"w{i}", zeros, w.size)
        else:
            n, m = pattern
            mat = as_matrix(layer, w)
            tail = -mat.shape[1] % m
            groups = np.pad(mat != 0, ((0, 0), (0, tail))).reshape(mat.shape[0], -1, m)
            assert groups.sum(axis=2).max() <= n, f"w{i}: more than {n} of {m} kept"


@pytest.mark.parametrize("method,solver", UNSTRUCTURED)
@settings(max_examples=60, **SETTINGS)
@given(case=cases(), sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]), options=layerwise_options)
def test_unstructured_sparsity(method, solver, case, sparsity, options):
    out = prune_written(case, method=method, solver=solver, sparsity=sparsity, allocation="uniform", **options)
    check_unstructured(out, sparsity, None)


@pytest.mark.parametrize("method,solver", [m for m in UNSTRUCTURED if m[0] != "magnitude"])
@settings(max_examples=25, **SETTINGS)
@given(case=cases(), sparsity=st.sampled_from([0.3, 0.5, 0.75, 0.9]), options=layerwise_options)
def test_default_allocation_meets_the_global_target(method, solver, case, sparsity, options):
    """The default (auto) allocation: sparsity of all the pruned sites' weights together, no site
    beyond the 0.9 cap unless its own zeros already were, the zeros there stay zeros."""
    out = prune_written(case, method=method, solver=solver, sparsity=sparsity, **options)
    assert out.report.to_dict()["settings"]["allocation"] == "auto"
    before, after = weights(out.original), weights(out.pruned)
    names = [r.name for r in out.report.sites]
    zeros = {n: int(np.sum(after[n] == 0)) for n in names}
    forced = {n: int(np.sum(before[n] == 0)) for n in names}
    for n in names:
        assert np.all(after[n][before[n] == 0] == 0)
        assert zeros[n] <= max(round(0.9 * before[n].size) + 1, forced[n]), n
    target = max(round(sparsity * sum(before[n].size for n in names)), sum(forced.values()))
    assert abs(sum(zeros.values()) - target) <= len(names)


@pytest.mark.parametrize("method,solver", UNSTRUCTURED)
@settings(max_examples=40, **SETTINGS)
@given(case=cases(), pattern=st.sampled_from([(2, 4), (1, 3), (3, 8)]), options=layerwise_options)
def test_unstructured_pattern(method, solver, case, pattern, options):
    out = prune_written(case, method=method, solver=solver, pattern=pattern, **options)
    check_unstructured(out, None, pattern)


# ---------------------------------------------------------------- full-network OBS

@pytest.mark.parametrize("method", ["obs", "obd", "magnitude"])
@settings(max_examples=40, **SETTINGS)
@given(case=cases(mlps(max_layers=2, max_width=6)), sparsity=st.sampled_from([0.3, 0.6]))
def test_full_network(method, case, sparsity):
    """One pool over all selected weights: the pool, not each site, reaches the target."""
    out = prune_written(case, method=method, sparsity=sparsity, hessian="full")
    untouched_identical(tensors(out.original), tensors(out.pruned), {f"w{i}" for i in case.selected})
    after = weights(out.pruned)
    pool = [after[f"w{i}"] for i in case.selected]
    zeros, size = sum(int(np.sum(w == 0)) for w in pool), sum(w.size for w in pool)
    assert zeros >= round(sparsity * size), (zeros, size)


# ---------------------------------------------------------------- structured

def removable(net: Net, i: int) -> bool:
    """Whether structured pruning can take units from layer i: not the last layer (its units reach
    the graph output) nor a grouped Conv, and read by an ungrouped layer, through depthwise Convs
    only (their channels follow their inputs')."""
    layers = net.layers
    if i == len(layers) - 1 or isinstance(layers[i], Conv) and layers[i].group > 1:
        return False
    channels = layers[i].c_out if isinstance(layers[i], Conv) else layers[i].width
    for layer in layers[i + 1:]:
        if not isinstance(layer, Conv) or layer.group == 1:
            return True
        if layer.group != channels:
            return False
        channels = layer.c_out
    return False


def owned_tensors(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """The weights `names` and every constant input of their nodes, plus the bias of an Add after
    a MatMul."""
    consts = {t.name for t in model.graph.initializer}
    owned = set(names)
    for node in model.graph.node:
        if set(node.input) & names:
            owned |= set(node.input) & consts
            if node.op_type == "MatMul":
                owned |= {i for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input
                          for i in n.input if i in consts}
    return owned


def float_params(model: onnx.ModelProto) -> int:
    return sum(w.size for w in weights(model).values())


def index(name: str) -> int:
    return int(re.fullmatch(r"w(\d+)", name)[1])


@pytest.mark.parametrize("method", ["obs", "magnitude"])
@settings(max_examples=60, **SETTINGS)
@given(case=cases(), sparsity=st.sampled_from([0.25, 0.5, 0.75]),
       structure=st.sampled_from(["neurons", "channels"]))
def test_structured(method, case, sparsity, structure):
    """Every removable selected layer loses round(sparsity * units) units (at least one stays);
    only those layers, the layers reading them and the depthwise Convs between change."""
    net = case.net
    expected = {f"w{i}" for i in case.selected if removable(net, i)}
    kw = dict(method=method, sparsity=sparsity, structure=structure)
    if not expected:
        with pytest.raises(OnnxObsError, match="no selected layer has units"):
            prune_written(case, **kw)
        return
    out = prune_written(case, **kw)
    assert float_params(out.pruned) <= float_params(out.original)
    assert {e["name"] for e in out.report.structure} == expected
    after, touched = weights(out.pruned), set()
    for entry in out.report.structure:
        removed = min(round(sparsity * entry["units_before"]), entry["units_before"] - 1)
        assert entry["units_after"] == entry["units_before"] - removed
        i = index(entry["name"])
        assert as_matrix(net.layers[i], after[entry["name"]]).shape[0] == entry["units_after"]
        last = max(index(c) for c in entry["consumers"])
        touched |= {f"w{k}" for k in range(i, last + 1)}
    untouched_identical(tensors(out.original), tensors(out.pruned), owned_tensors(out.original, touched))


# ---------------------------------------------------------------- regressions the properties found

@pytest.mark.parametrize("method", ["obs", "obd", "wanda"])
def test_grouped_conv_reaches_the_site_sparsity(method):
    """Three groups of 3 weights at 75%: round(6.75) = 7 zeros in the site, where rounding each
    group's share on its own gave 3 x round(2.25) = 6."""
    model, feeds = conv_model(dims=1, c_in=3, c_out=3, group=3, kernel=3, spatial=7)
    pruned = api.prune(model, feeds, method=method, sparsity=0.75).model
    assert int(np.sum(weights(pruned)["W"] == 0)) == 7


def test_flatten_after_a_one_channel_conv_keeps_the_channel():
    """[N, 1, 1, 2] -> Flatten -> [N, 2]: the 2 that ends both shapes holds the channel, which
    feeds the Gemm's columns 0 and 1 (the trace said Flatten "splits or mixes" it)."""
    conv = Conv(1, (1, 1), (0, 0, 0, 0), (2, 1), (1, 1), 1, False, None)
    model = build(Net((1, 2, 2), (conv,), (Dense("Gemm", 3, 1, False, None),), 0, 0.0))
    groups, left = trace_units(model, find_sites(model)[0], {"w0"})
    assert not left
    assert [c.site.name for c in groups[0].consumers] == ["w1"]
    assert [c.tolist() for c in groups[0].consumers[0].columns] == [[0, 1]]

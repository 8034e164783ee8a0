"""A one-layer BERT-like encoder built with onnx.helper (no torch): self-attention with heads
(Q, K, V projections, Reshape [B, T, heads, head_dim], Transpose, QK^T / sqrt(d), Softmax, PV,
Transpose, Reshape [B, T, hidden], output projection), residual + LayerNorm, and an FFN with the
Erf-decomposed Gelu that torch exports (x * 0.5 * (1 + erf(x / sqrt 2))), residual + LayerNorm."""

from __future__ import annotations

import numpy as np
from graphs import init, make_model, randn, vi
from onnx import helper

HIDDEN, HEADS, FFN, TOKENS = 16, 4, 24, 5
HEAD_DIM = HIDDEN // HEADS


def _node(op, ins, out, **kw):
    return helper.make_node(op, ins, [out], name=out, **kw)


def bert_weights(seed: int = 0) -> dict[str, np.ndarray]:
    a = {}
    for i, name in enumerate(["q", "k", "v", "o"]):
        a[f"W{name}"] = randn([HIDDEN, HIDDEN], seed + 2 * i) / 4
        a[f"b{name}"] = randn([HIDDEN], seed + 2 * i + 1) / 4
    a["W1"], a["b1"] = randn([HIDDEN, FFN], seed + 10) / 4, randn([FFN], seed + 11) / 4
    a["W2"], a["b2"] = randn([FFN, HIDDEN], seed + 12) / 4, randn([HIDDEN], seed + 13) / 4
    a["Wc"], a["bc"] = randn([HIDDEN, 3], seed + 14), randn([3], seed + 15)
    return a


def _computed_target(name: str, tail: list[str]) -> list:
    """Nodes computing [x.shape[0], x.shape[1], *tail] as torch's legacy exporter writes
    view(b, t, ...): Shape, Gather, Unsqueeze, Concat with constant pieces."""
    nodes = [_node("Shape", ["x"], f"{name}_shape")]
    for i in (0, 1):
        nodes += [_node("Gather", [f"{name}_shape", f"index{i}"], f"{name}_d{i}", axis=0),
                  _node("Unsqueeze", [f"{name}_d{i}", "axis0"], f"{name}_u{i}")]
    return nodes + [_node("Concat", [f"{name}_u0", f"{name}_u1", *tail], name, axis=0)]


def bert_model(a: dict[str, np.ndarray] | None = None, computed: bool = False, shared: bool = False):
    """x [batch, TOKENS, HIDDEN] -> logits [batch, TOKENS, 3]; (model, weights). computed:
    the Reshape targets are computed from x's shape as torch's legacy exporter does, with the
    heads count and hidden width as constants ("heads_q", ..., "width") in the Concat. shared:
    as the dynamo exporter writes them, one constant [-1, TOKENS, HEADS, HEAD_DIM] read by the
    q, k and v Reshapes, all with allowzero=1."""
    a = bert_weights() if a is None else a
    consts = dict(a)
    nodes = []
    if computed:
        for name in ("q", "k", "v"):
            consts[f"heads_{name}"] = np.array([HEADS], np.int64)
            consts[f"head_dim_{name}"] = np.array([HEAD_DIM], np.int64)
            nodes += _computed_target(f"split_heads_{name}", [f"heads_{name}", f"head_dim_{name}"])
        consts.update({"width": np.array([HIDDEN], np.int64), "index0": np.array(0, np.int64),
                       "index1": np.array(1, np.int64), "axis0": np.array([0], np.int64)})
        nodes += _computed_target("merge_heads", ["width"])
    elif shared:
        consts.update({f"split_heads_{k}": None for k in "qkv"})
        consts.update({"split_heads": np.array([-1, TOKENS, HEADS, HEAD_DIM], np.int64),
                       "merge_heads": np.array([-1, TOKENS, HIDDEN], np.int64)})
    else:
        consts.update({"split_heads_q": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
                       "split_heads_k": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
                       "split_heads_v": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
                       "merge_heads": np.array([0, 0, HIDDEN], np.int64)})
    consts.update({"scale": np.array(np.sqrt(HEAD_DIM), np.float32),
                   "ln1_g": np.ones(HIDDEN, np.float32), "ln1_b": np.zeros(HIDDEN, np.float32),
                   "ln2_g": np.ones(HIDDEN, np.float32), "ln2_b": np.zeros(HIDDEN, np.float32),
                   "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
                   "half": np.array(0.5, np.float32)})
    for name, perm in [("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])]:
        nodes += [_node("MatMul", ["x", f"W{name}"], f"{name}_mm"),
                  _node("Add", [f"{name}_mm", f"b{name}"], f"{name}_lin"),
                  _node("Reshape", [f"{name}_lin", "split_heads" if shared else f"split_heads_{name}"],
                        f"{name}_heads", **({"allowzero": 1} if shared else {})),
                  _node("Transpose", [f"{name}_heads"], f"{name}_t", perm=perm)]
    nodes += [_node("MatMul", ["q_t", "k_t"], "scores"),
              _node("Div", ["scores", "scale"], "scaled"),
              _node("Softmax", ["scaled"], "probs", axis=-1),
              _node("MatMul", ["probs", "v_t"], "context"),
              _node("Transpose", ["context"], "context_t", perm=[0, 2, 1, 3]),
              _node("Reshape", ["context_t", "merge_heads"], "merged", **({"allowzero": 1} if shared else {})),
              _node("MatMul", ["merged", "Wo"], "o_mm"), _node("Add", ["o_mm", "bo"], "o_lin"),
              _node("Add", ["o_lin", "x"], "res1"),
              _node("LayerNormalization", ["res1", "ln1_g", "ln1_b"], "ln1", axis=-1),
              _node("MatMul", ["ln1", "W1"], "f1_mm"), _node("Add", ["f1_mm", "b1"], "f1"),
              _node("Div", ["f1", "sqrt2"], "g_div"), _node("Erf", ["g_div"], "g_erf"),
              _node("Add", ["g_erf", "one"], "g_add"), _node("Mul", ["f1", "g_add"], "g_mul"),
              _node("Mul", ["g_mul", "half"], "gelu"),
              _node("MatMul", ["gelu", "W2"], "f2_mm"), _node("Add", ["f2_mm", "b2"], "f2"),
              _node("Add", ["f2", "ln1"], "res2"),
              _node("LayerNormalization", ["res2", "ln2_g", "ln2_b"], "ln2", axis=-1),
              _node("MatMul", ["ln2", "Wc"], "c_mm"), _node("Add", ["c_mm", "bc"], "y")]
    model = make_model(nodes, [vi("x", shape=["batch", TOKENS, HIDDEN])],
                       [vi("y", shape=["batch", TOKENS, 3])],
                       [init(k, np.asarray(v, np.float32) if v.dtype != np.int64 else v)
                        for k, v in consts.items() if v is not None])
    return model, a

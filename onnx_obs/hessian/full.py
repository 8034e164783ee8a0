"""Per-sample weight derivatives X_k = dF(w, in_k)/dw for full-network OBS (Hassibi & Stork 1992,
Eqs. 12-14), from the deltas of each linear node and its input vectors; plus the error and loss
gradients that define the targets. Plain numpy: the caller supplies arrays.

For a linear node z = W x (W: rows = output units, columns = inputs), unit u of the network output
and sample b, dF_u/dW[r, c] = sum over the sample's positions p of delta_u[p, r] * x[p, c], where
delta_u = dF_u/dz (one position per token of a MatMul, per output pixel of a convolution); the
bias derivative is sum_p delta_u[p, r]. Positions are batch-major: of n positions in a batch of
B samples, sample b owns [b n/B, (b+1) n/B). Gemm's alpha (Y = alpha A'B' + beta C) scales the
weight derivatives and beta the bias derivatives.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("rows", "cols", "channels")


def delta_vectors(delta: np.ndarray, layout: str, rows: int, groups: int = 1) -> np.ndarray:
    """Deltas (U, *z) of a node output z -> (U, groups, positions, rows / groups), float64.

    layout: "rows" (z's last axis holds the output units: weight on the right of a MatMul/Gemm),
    "cols" (its second-to-last axis does: weight on the left), "channels" (axis 1 of an
    (N, C, *spatial) Conv / ConvTranspose output; groups split the channels).
    """
    u = delta.shape[0]
    if layout == "rows":
        v = delta.reshape(u, 1, -1, rows)
    elif layout == "cols":
        v = (delta if delta.ndim == 2 else np.swapaxes(delta, -1, -2)).reshape(u, 1, -1, rows)
    elif layout == "channels":
        n = delta.shape[1]
        v = delta.reshape(u, n, groups, rows // groups, -1).transpose(0, 2, 1, 4, 3)
        v = v.reshape(u, groups, -1, rows // groups)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return v.astype(np.float64, copy=False)


def weight_derivatives(deltas: np.ndarray, inputs: np.ndarray, batch: int,
                       scale: float = 1.0) -> np.ndarray:
    """Per-sample derivatives of every output unit w.r.t. the node's 2-D weight matrix.

    deltas: (U, groups, n, rows/groups) from delta_vectors; inputs: (groups, n, cols), the input
    vectors in the same position order (hessian.layerwise.input_vectors). Returns
    (batch, U, rows * cols): row-major over the weight matrix, the rows of group g at
    [g rows/groups, (g+1) rows/groups).
    """
    u, g, n, rg = deltas.shape
    if inputs.shape[:2] != (g, n) or n % batch:
        raise ValueError(f"{n} delta positions in {g} groups do not match input vectors "
                         f"{inputs.shape} for a batch of {batch}")
    m = n // batch
    d = deltas.reshape(u, g, batch, m, rg).transpose(2, 0, 1, 4, 3)  # (B, U, g, rg, m)
    x = inputs.reshape(g, batch, m, -1).transpose(1, 0, 2, 3).astype(np.float64, copy=False)
    out = np.matmul(d, x[:, None])  # (B, U, g, rg, cols): sum over the sample's positions
    if scale != 1.0:
        out *= scale
    return out.reshape(batch, u, -1)


def bias_derivatives(deltas: np.ndarray, batch: int, scale: float = 1.0) -> np.ndarray:
    """Per-sample derivatives w.r.t. the node's bias (one per output unit): (batch, U, rows)."""
    u, g, n, rg = deltas.shape
    out = deltas.reshape(u, g, batch, n // batch, rg).sum(axis=3)  # (U, g, B, rg)
    return scale * out.transpose(2, 0, 1, 3).reshape(batch, u, g * rg)


# ---- targets, error and per-sample loss gradients --------------------------------------------


def is_classifier(outputs: np.ndarray, labels: np.ndarray) -> bool:
    """Class scores (batch, C > 1) with labels given as class indices or one-hot rows."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return False
    if labels.ndim == 1:
        return labels.dtype.kind in "iub"
    return labels.shape[1:] == outputs.shape[1:] and bool(np.all((labels == 0) | (labels == 1)))


def target_array(labels: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Labels as regression targets shaped like `outputs` (class indices become one-hot rows)."""
    labels = np.asarray(labels)
    if labels.shape == outputs.shape:
        return labels.astype(np.float64)
    if labels.ndim == 1 and outputs.ndim == 2 and labels.dtype.kind in "iub" and outputs.shape[1] > 1:
        if labels.min() < 0 or labels.max() >= outputs.shape[1]:
            raise ValueError(f"class labels must lie in [0, {outputs.shape[1]})")
        return np.eye(outputs.shape[1])[labels]
    if labels.size == outputs.size:
        return labels.reshape(outputs.shape).astype(np.float64)
    raise ValueError(f"labels of shape {labels.shape} do not match outputs of shape {outputs.shape}")


def squared_error(outputs: np.ndarray, targets: np.ndarray) -> float:
    """sum_k 1/2 ||F_k - t_k||^2 over the batch (Eq. 12's error is this over P, the sample count)."""
    d = outputs.astype(np.float64) - targets
    return 0.5 * float(np.sum(d * d))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(outputs: np.ndarray, onehot: np.ndarray) -> float:
    """sum_k -log softmax(F_k)[label_k] over the batch."""
    z = outputs.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -float(np.sum(onehot * logp))


def loss_gradient(outputs: np.ndarray, targets: np.ndarray, classifier: bool) -> np.ndarray:
    """d loss_k / d F_k per sample: softmax(F) - onehot for cross-entropy, F - t for 1/2 ||F - t||^2."""
    if classifier:
        return softmax(outputs.astype(np.float64)) - targets
    return outputs.astype(np.float64) - targets

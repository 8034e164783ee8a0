"""A small BERT-like encoder trained for seconds on a synthetic sequence task and exported to ONNX
with torch (for scripts/bench_structured.py only; the package never imports torch).

The task: 10 classes; a sequence of 32 tokens (32 features each) is noise with two of the class's
four fixed "key" tokens at random positions, scaled at random; an order-free mean of the tokens
is not enough to tell classes that share keys apart, attention is. Attention is hand-written
(Linear q/k/v, view/transpose, softmax, Linear out) or torch's nn.MultiheadAttention (packed
in_proj weight); post-LayerNorm residual blocks with a Gelu FFN, mean over tokens, a linear head.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_models import fit_and_export

CLASSES, TOKENS, FEATURES = 10, 32, 32
HIDDEN, HEADS, FFN, LAYERS = 128, 8, 512, 2


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.random.default_rng(0).standard_normal((CLASSES, 4, FEATURES)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, TOKENS, FEATURES)).astype(np.float32)
    for i in range(n):
        pos = rng.choice(TOKENS, 2, replace=False)
        which = rng.choice(4, 2, replace=False)
        x[i, pos] += rng.uniform(1.0, 2.0) * keys[y[i], which]
    return x, y


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.d = HIDDEN // HEADS

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, HEADS, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
        return self.out((p @ v).transpose(1, 2).reshape(b, t, HIDDEN))


class Packed(nn.Module):
    """torch's nn.MultiheadAttention: one in_proj MatMul produces Q, K and V."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Layer(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attn, self.ln1, self.ln2 = attention(), nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.ffn = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ffn(x))


class Bertish(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.embed = nn.Linear(FEATURES, HIDDEN)
        self.pos = nn.Parameter(torch.zeros(TOKENS, HIDDEN))
        self.layers = nn.Sequential(*(Layer(attention) for _ in range(LAYERS)))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.head(self.layers(self.embed(x) + self.pos).mean(1))


ARCHS = {"bert": Attention, "bert-mha": Packed}


def train_and_export(arch: str, path: Path, steps: int = 300, seed: int = 0,
                     dynamo: bool = False) -> float:
    """Train on fresh synthetic batches, export (eval mode, opset 17, dynamic batch); return the
    held-out accuracy."""
    torch.manual_seed(seed)
    return fit_and_export(Bertish(ARCHS[arch]), data, path, steps, seed, lr=2e-3, dynamo=dynamo)

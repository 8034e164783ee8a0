"""A small ViT trained for seconds on the synthetic image task of scripts/torch_models.py and
exported to ONNX with torch (for scripts/bench_vit.py only; the package never imports torch).

16x16 images cut into 4x4 patches (a stride-4 Conv: 16 tokens of width 128), a learned position
embedding, the two post-LayerNorm encoder layers of scripts/torch_bert.py (hand-written
attention, 8 heads, Gelu FFN of 512), mean over tokens, a linear head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch_bert import HIDDEN, LAYERS, Attention, Layer
from torch_models import CLASSES, SIZE, data, fit_and_export

PATCH = 4


class ViTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, HIDDEN, PATCH, PATCH)
        self.pos = nn.Parameter(torch.zeros((SIZE // PATCH) ** 2, HIDDEN))
        self.layers = nn.Sequential(*(Layer(Attention) for _ in range(LAYERS)))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.layers(tokens).mean(1))


def train_and_export(path: Path, steps: int = 300, seed: int = 0) -> float:
    """Train, export (opset 17, dynamic batch); return the held-out accuracy."""
    torch.manual_seed(seed)
    return fit_and_export(ViTish(), data, path, steps, seed, lr=1e-3)

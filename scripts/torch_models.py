"""Small CNNs of the shapes people ship, trained for seconds on synthetic data and exported to ONNX
with torch (for scripts/bench_structured.py only; the package never imports torch).

The task: 10 classes, each a fixed random 3x16x16 template; a sample is its class's template
scaled at random plus noise. Both nets reach high accuracy in a few hundred steps,
so top-1 agreement with the original measures something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES = 10
SIZE = 16


def data(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """n samples at size x size pixels: the 16x16 templates enlarged (each pixel repeated in a
    block) and noise whose std grows with the block side, so that averaging each block gives back
    the 16x16 task exactly: a larger input costs more compute, the task stays as hard."""
    templates = np.random.default_rng(0).standard_normal((CLASSES, 3, SIZE, SIZE)).astype(np.float32)
    r = size // SIZE
    if r * SIZE != size:
        raise ValueError(f"size must be a multiple of {SIZE}")
    templates = templates.repeat(r, axis=2).repeat(r, axis=3)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    scale = rng.uniform(0.5, 1.5, (n, 1, 1, 1)).astype(np.float32)
    x = scale * templates[y] + 2.0 * r * rng.standard_normal((n, 3, size, size)).astype(np.float32)
    return x.astype(np.float32), y


def bn(c):
    return nn.BatchNorm2d(c)


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand=4):
        super().__init__()
        h = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False), bn(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), bn(h), nn.ReLU6(),
            SE(h), nn.Conv2d(h, c_out, 1, bias=False), bn(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def wide(c: int, width: float) -> int:
    """A channel count times the width multiplier, in multiples of 8 (as MobileNet's)."""
    return max(8, round(c * width / 8) * 8)


class MobileNetish(nn.Module):
    """MobileNetV2/V3-style: inverted residual blocks with SE and residual Adds."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 40, 2), (40, 40, 1), (40, 64, 2), (64, 64, 1)]
        cfg = [(wide(a, width), wide(b, width), s) for a, b, s in cfg]
        c0, c1, c2 = wide(16, width), wide(64, width), wide(128, width)
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), bn(c0), nn.ReLU6())
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in cfg])
        self.head = nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), bn(c2), nn.ReLU6())
        self.fc = nn.Linear(c2, CLASSES)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), bn(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), bn(c_out)
        self.down = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """ResNet-18 layout (4 stages of 2 basic blocks) at widths 16-128 for 16x16 inputs."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = wide(16, width)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), bn(c), nn.ReLU())
        layers = []
        for w, s in [(16, 1), (32, 2), (64, 2), (128, 2)]:
            w = wide(w, width)
            layers += [Basic(c, w, s), Basic(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def cbs(c_in, c_out, k=1, s=1):
    """YOLO's Conv: conv, BatchNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), bn(c_out), nn.SiLU())


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, split in two, n bottlenecks with shortcuts on the second half,
    every intermediate concatenated, 1x1 conv."""

    def __init__(self, c, n=2):
        super().__init__()
        self.h = c // 2
        self.cv1, self.cv2 = cbs(c, c), cbs((2 + n) * self.h, c)
        self.m = nn.ModuleList(nn.Sequential(cbs(self.h, self.h, 3), cbs(self.h, self.h, 3)) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.h, self.h), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YOLOish(nn.Module):
    """A YOLOv8-style backbone of C2f stages as a classifier."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbs(3, 32, 3), C2f(32), cbs(32, 64, 3, 2), C2f(64),
                                  cbs(64, 128, 3, 2), C2f(128))
        self.fc = nn.Linear(128, CLASSES)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


ARCHS = {"mobilenet": MobileNetish, "resnet": ResNetish, "c2f": YOLOish}


def train_and_export(arch: str, path: Path, steps: int = 300, seed: int = 0, size: int = SIZE,
                     width: float = 1.0) -> float:
    """Train on fresh synthetic batches of size x size inputs (channels times `width`: mobilenet
    and resnet), export (eval mode, opset 17, dynamic batch); return the held-out accuracy."""
    torch.manual_seed(seed)
    net = ARCHS[arch](width) if width != 1.0 else ARCHS[arch]()
    return fit_and_export(net, lambda n, s: data(n, s, size), path, steps, seed, lr=3e-3)


def fit_and_export(net: nn.Module, make_data, path: Path, steps: int, seed: int, lr: float,
                   dynamo: bool = False) -> float:
    """Adam on `steps` batches of 32 from make_data(n, seed), then export (eval mode, opset 17,
    dynamic batch); return the accuracy on 512 held-out samples."""
    opt = torch.optim.Adam(net.parameters(), lr)
    x_all, y_all = make_data(steps * 32, seed + 1)
    net.train()
    for i in range(steps):
        xb, yb = torch.from_numpy(x_all[i * 32:(i + 1) * 32]), torch.from_numpy(y_all[i * 32:(i + 1) * 32])
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y = make_data(512, 999)
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    torch.onnx.export(net, torch.from_numpy(x[:1]), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=dynamo)
    return acc

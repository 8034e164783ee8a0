"""Activation ranges from calibration batches and the uint8 grid that covers them.

An activation tensor x is fake-quantized per tensor as x_q = (clip(round(x / s) + z, 0, 255) - z) * s
(onnxruntime's QuantizeLinear / DequantizeLinear, round half to even). The range [lo, hi] always
holds 0 so that 0 is exact (zero padding, Relu outputs): s = (hi - lo) / 255, z = round(-lo / s).
"""

from __future__ import annotations

import numpy as np

CALIBRATIONS = ("minmax", "percentile")
SAMPLE_PER_BATCH = 1 << 14  # percentile: values kept per batch (all, or a seeded random draw)


class ActivationRange:
    """Running range of one tensor over calibration batches: min-max, or percentiles of the
    values (exact up to SAMPLE_PER_BATCH values a batch, else of a seeded random draw from each
    batch: 64 KB a batch and tensor, where a stride could alias onto a few channels or columns)."""

    def __init__(self, calibration: str = "minmax", percentile: float = 99.99):
        if calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibration!r}")
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.calibration, self.percentile = calibration, percentile
        self.lo, self.hi = np.inf, -np.inf
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def add(self, x: np.ndarray) -> None:
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.calibration == "percentile":
            keep = flat if flat.size <= SAMPLE_PER_BATCH else flat[self.rng.integers(0, flat.size, SAMPLE_PER_BATCH)]
            self.samples.append(keep)

    def range(self) -> tuple[float, float]:
        """[lo, hi] with 0 inside; (0, 0) when nothing finite was seen."""
        lo, hi = (self.lo, self.hi) if np.isfinite(self.lo) else (0.0, 0.0)
        if self.calibration == "percentile" and self.samples:
            values = np.concatenate(self.samples)
            lo, hi = np.percentile(values, [100 - self.percentile, self.percentile])
        return min(float(lo), 0.0), max(float(hi), 0.0)


def uint8_grid(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the asymmetric uint8 grid over [lo, hi] (lo <= 0 <= hi)."""
    if not lo <= 0 <= hi:
        raise ValueError(f"the range [{lo}, {hi}] must hold 0")
    scale = np.float32((hi - lo) / 255.0)
    if scale == 0 or not np.isfinite(scale):
        return np.float32(1.0), np.uint8(0)  # a constant-zero tensor: any grid is exact
    zero = np.clip(np.round(-lo / float(scale)), 0, 255)
    return scale, np.uint8(zero)


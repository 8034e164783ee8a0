"""Weights that look like fixed transforms rather than learned ones.

Models carry linear ops whose weights are constants of the method, not of training: a detector's
DFL projection (the integers 0..15 that decode box distances), identity or selection matrices,
and DFT / DCT / STFT bases of audio front ends. Pruning them breaks the model for no size gain.
`fixed_transform` recognises them from the 2-D view (rows = output units) alone.
"""

from __future__ import annotations

import numpy as np

# A row counts as one sinusoid (possibly windowed) when its TOP_BINS largest rfft bins hold at
# least CONCENTRATION of its energy: a Hann-windowed sinusoid spreads over about 3 bins, a
# half-integer frequency (DCT-II) leaves about 90% in 4; a learned row of n weights holds about
# 8/n there.
TOP_BINS, CONCENTRATION = 4, 0.85


def fixed_transform(w: np.ndarray) -> str | None:
    """What fixed transform the 2-D weight `w` looks like, or None when it looks learned."""
    w = np.asarray(w, dtype=np.float64)
    if not w.size or not np.any(w):
        return None
    if _integers(w.ravel()[:1024]) and _integers(w):   # a prefix first: learned weights fail fast
        return _integer_kind(np.round(w))
    # a spread sample of rows first, then all of them
    sample = w[np.linspace(0, len(w) - 1, min(len(w), 64)).astype(int)]
    if _sinusoid_rows(sample) and _sinusoid_rows(w):
        return "its rows are sinusoids of distinct frequencies (a DFT/DCT/STFT basis)"
    return None


def _integers(w: np.ndarray) -> bool:
    return bool(np.all(np.abs(w - np.round(w)) <= 1e-6 * np.maximum(1.0, np.abs(w))))


def _integer_kind(w: np.ndarray) -> str:
    rows, cols = w.shape
    if rows == cols and np.array_equal(w, np.eye(rows)):
        return "an identity matrix"
    if np.all((w == 0) | (w == 1)) and np.all(w.sum(1) <= 1):
        return "a 0/1 selection matrix"
    for row in w:
        if len(row) > 2 and np.array_equal(row, np.arange(len(row))):
            return f"the integers 0..{len(row) - 1} (a fixed decode, such as a DFL projection)"
    return "only integer values"


def _sinusoid_rows(w: np.ndarray) -> bool:
    """Whether nearly every row is one sinusoid, at frequencies that differ across rows."""
    rows = w[np.any(w != 0, axis=1)]
    if len(rows) < 4 or w.shape[1] < 8 * TOP_BINS:
        return False
    power = np.abs(np.fft.rfft(rows, axis=1)) ** 2
    top = np.sort(power, axis=1)[:, -TOP_BINS:].sum(1) / power.sum(1)
    if np.mean(top >= CONCENTRATION) < 0.9:
        return False
    # cos and sin rows of one frequency share a peak: at least ~half the rows differ
    peaks = np.argmax(power, axis=1)
    return len(np.unique(peaks)) >= max(3, 0.4 * len(rows))

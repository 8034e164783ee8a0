"""Removal scores of the no-correction baselines: magnitude, OBD and Wanda.

Each returns a score array shaped like W (lower = remove first) from W and diag(H); the caller
selects the mask and zeroes the weights without correcting the others.
"""

from __future__ import annotations

import numpy as np


def magnitude_scores(W: np.ndarray, h_diag: np.ndarray | None = None) -> np.ndarray:
    """|w|: the smallest weights go first (no Hessian needed)."""
    return np.abs(W)


def obd_scores(W: np.ndarray, h_diag: np.ndarray) -> np.ndarray:
    """Optimal Brain Damage saliency H_qq w_q^2 / 2 (LeCun et al. 1990, diagonal Hessian)."""
    return 0.5 * h_diag * W * W


def wanda_scores(W: np.ndarray, h_diag: np.ndarray) -> np.ndarray:
    """Wanda |w_ij| * ||x_j|| (Sun et al. 2023); ||x_j|| is proportional to sqrt(H_jj)."""
    return np.abs(W) * np.sqrt(h_diag)


# method name -> score(W, diag H): a new no-correction method is one entry here
SCORES = {"obd": obd_scores, "wanda": wanda_scores, "magnitude": magnitude_scores}

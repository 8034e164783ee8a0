"""How far one model's outputs are from another's: the numbers every command reports."""

from __future__ import annotations

import numpy as np


def is_classifier_like(y: np.ndarray) -> bool:
    return y.dtype.kind == "f" and y.ndim == 2 and y.shape[1] > 1


def is_sequence_like(y: np.ndarray) -> bool:
    """Scores per position: float [batch, positions, classes] (a tagger's, an OCR or speech
    model's output); agreement is then counted per position."""
    return y.dtype.kind == "f" and y.ndim == 3 and y.shape[2] > 1


class OutputDeviation:
    """Streams pairs of output batches (reference, candidate) and summarises their distance."""

    def __init__(self):
        self.sq_err = 0.0
        self.sq_ref = 0.0
        self.dot = 0.0
        self.sq_cand = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.top1 = 0
        self.top5 = 0
        self.rows = 0
        self.has_top5 = False
        self.per_position = False   # agreement counted over the positions of [N, T, C] outputs

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        d = r - c
        self.sq_err += float(np.sum(d * d))
        self.sq_ref += float(np.sum(r * r))
        self.sq_cand += float(np.sum(c * c))
        self.dot += float(np.sum(r * c))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        self.count += d.size
        if is_sequence_like(ref):   # each position is a row of class scores
            ref, cand = ref.reshape(-1, ref.shape[2]), cand.reshape(-1, cand.shape[2])
            self.per_position = True
        if is_classifier_like(ref):
            self.rows += len(ref)
            self.top1 += int(np.sum(ref.argmax(1) == cand.argmax(1)))
            if ref.shape[1] > 5:
                self.has_top5 = True
                top5 = np.argpartition(-cand, 5, axis=1)[:, :5]
                self.top5 += int(np.sum((top5 == ref.argmax(1)[:, None]).any(1)))

    def summary(self) -> dict:
        out = {
            "relative_mse": self.sq_err / self.sq_ref if self.sq_ref > 0 else float(self.sq_err > 0),
            "max_abs_error": self.max_abs,
            "cosine": self.dot / np.sqrt(self.sq_ref * self.sq_cand) if self.sq_ref * self.sq_cand > 0
            else float(self.sq_err == 0),
        }
        if self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            if self.per_position:
                out["positions"] = self.rows
            if self.has_top5:
                out["top5_agreement"] = self.top5 / self.rows
        return out


def compare_runs(ref_runner, cand_runner, batches, observe=None) -> dict[str, dict]:
    """Run both models on every batch; per-output deviation summaries keyed by output name.

    `observe(ref_outputs, cand_outputs)`, if given, also sees each batch's outputs (in order).
    """
    stats = {name: OutputDeviation() for name in ref_runner.output_names}
    for feeds in batches:
        ref_out, cand_out = ref_runner.run(feeds), cand_runner.run(feeds)
        for name, a, b in zip(ref_runner.output_names, ref_out, cand_out):
            stats[name].add(np.asarray(a), np.asarray(b))
        if observe is not None:
            observe(ref_out, cand_out)
    return {k: v.summary() for k, v in stats.items()}


def relative_mse(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """sum over float outputs of ||y - y'||^2 / ||y||^2, every batch pooled (reference[b][o]:
    output o of batch b; outputs likewise): how far a changed model's outputs moved."""
    err: dict[int, float] = {}
    ref: dict[int, float] = {}
    for ys, zs in zip(reference, outputs):
        for o, (y, z) in enumerate(zip(ys, zs)):
            if np.asarray(y).dtype.kind != "f":
                continue
            y = np.asarray(y, dtype=np.float64)
            d = y - np.asarray(z, dtype=np.float64)
            err[o] = err.get(o, 0.0) + float(np.vdot(d, d))
            ref[o] = ref.get(o, 0.0) + float(np.vdot(y, y))
    return sum(err[o] / ref[o] for o in err if ref[o] > 0)


def top1_correct(scores: np.ndarray, labels: np.ndarray) -> int:
    """How many rows of class scores put their maximum on the label (an index, or one-hot)."""
    target = labels.argmax(1) if labels.ndim == 2 else labels
    return int(np.sum(scores.argmax(1) == target))

"""Quality-versus-sparsity curves of a `compare` result (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path

from onnx_obs.compare import Comparison
from onnx_obs.errors import OnnxObsError

INSTALL_HINT = "pip install 'onnx-obs[plot]'"
LABELS = {"accuracy": "accuracy", "top1_agreement": "top-1 agreement with the original",
          "relative_mse": "relative MSE of the output"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_compare(result: Comparison, path: str | Path) -> list[Path]:
    """Draw one line per method and write PATH.png and PATH.svg; return both paths."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        raise OnnxObsError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    metric = result.metric
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    quant = result.file_size is not None  # a --bits sweep: quality against file size
    x = (lambda r: r.file_size / 1024) if quant else (lambda r: r.sparsity)
    for method in dict.fromkeys(r.series for r in result.rows):
        rows = sorted((r for r in result.rows if r.series == method), key=x)
        ax.plot([x(r) for r in rows], [getattr(r, metric) for r in rows], marker="o", label=method)
        for r in rows if quant else ():
            ax.annotate(f"{r.bits}b", (x(r), getattr(r, metric)), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    if quant and metric != "relative_mse":  # its original, 0, has no place on a log scale
        ax.plot([result.file_size / 1024], [result.baseline], marker="*", markersize=10,
                color="black", linestyle="none", label="original (float)")
    if metric == "relative_mse":
        ax.set_yscale("log")
    else:
        ax.axhline(result.baseline, color="grey", linestyle="--", linewidth=1,
                   label=f"original ({result.baseline:.1%})")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if quant:
        ax.set_xlabel("file size (KiB)")
    else:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("sparsity of the pruned weights")
    ev = result.eval
    where = "calibration" if ev.is_calibration else "held-out"
    ax.set_ylabel(f"{LABELS[metric]} ({where} data)")
    ax.set_title(f"{Path(result.model).name}: {LABELS[metric]} vs {'file size' if quant else 'sparsity'}\n"
                 f"{result.calibration.samples} calibration samples, scored on "
                 f"{ev.samples} {where} samples", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths = [Path(path).with_suffix(".png"), Path(path).with_suffix(".svg")]
    for p in paths:
        try:
            fig.savefig(p, dpi=150)
        except OSError as e:
            raise OnnxObsError(f"could not write the plot {p}: {e.strerror or e}") from e
    return paths

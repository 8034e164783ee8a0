"""onnx-obs: prune ONNX models with Optimal Brain Surgeon.

    import onnx_obs
    model, report = onnx_obs.prune("model.onnx", "calib.npz", sparsity=0.6)
    model, report = onnx_obs.prune("model.onnx", "calib.npz", onnx_obs.PruneConfig(method="obd"))
    model, report = onnx_obs.quantize("model.onnx", "calib.npz", bits=4, group_size=32)
"""

__version__ = "0.1.0"

from onnx_obs.api import PruneResult, inspect, prune, quantize  # noqa: E402
from onnx_obs.config import PruneConfig  # noqa: E402

__all__ = ["PruneConfig", "PruneResult", "__version__", "inspect", "prune", "quantize"]

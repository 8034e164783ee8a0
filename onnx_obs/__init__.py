"""onnx-obs: prune ONNX models with Optimal Brain Surgeon."""

__version__ = "0.1.0"

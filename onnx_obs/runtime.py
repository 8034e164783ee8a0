"""onnxruntime sessions: execution providers, models with external data, clear load errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_obs.errors import OnnxObsError, first_line
from onnx_obs.threads import current_threads

DEVICES = ("auto", "cpu", "cuda")
_ORT_VERSION = tuple(int(x) for x in ort.__version__.split(".")[:2])


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device not in DEVICES:
        raise OnnxObsError(f"unknown device '{device}': use one of {', '.join(DEVICES)}")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise OnnxObsError("--device cuda needs onnxruntime-gpu and a CUDA GPU: "
                           "pip install onnxruntime-gpu, or use --device cpu")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Runner:
    """One onnxruntime session over a model proto whose external data lives in `base_dir`."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = "", device: str = "cpu",
                 prepack: bool = True):
        """prepack=False: weights are not copied into packed buffers at load time (onnxruntime
        then memory-maps aligned external data), for a session that runs little or not at all."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = current_threads()
        # waiting threads sleep instead of spinning: a spinning pool burns the cores that other
        # processes (and numpy's BLAS between runs) need, 5x slower runs on a busy machine, and a
        # session's spinning threads slowed the next one's timed runs up to 15x on 2 cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.log_severity_level = 4  # fatal only: errors reach the user as one OnnxObsError line
        self.providers = providers_for(device)
        try:
            self.session = _session(model, base_dir, opts, self.providers)
        except OnnxObsError:
            raise
        except Exception as e:  # onnxruntime raises several private exception types
            raise OnnxObsError(f"onnxruntime cannot load the model: {first_line(e)}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            return self.session.run(outputs, feeds)
        except Exception as e:
            raise OnnxObsError(f"onnxruntime failed to run the model on {_describe_feeds(feeds)}: "
                               f"{first_line(e)}") from e


def _describe_feeds(feeds: dict) -> str:
    """'x float32[8, 4], scale float32[]': the inputs of a run and their shapes."""
    return ", ".join(f"{k} {np.asarray(v).dtype}{list(np.shape(v))}" for k, v in feeds.items())


def _session(model, base_dir, opts, providers):
    if not _locations(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    if _ORT_VERSION >= (1, 21):  # the folder option arrived in 1.21 (onnxruntime PR 23557)
        # A model loaded from memory finds its external data in this folder. (Symlinks, below,
        # are refused by newer onnxruntime: their targets lie outside the model's folder.)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(Path(base_dir or ".").resolve()))
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    # External data resolves relative to the model file: put the proto in a temp dir next to
    # symlinks of the original data files.
    with tempfile.TemporaryDirectory(prefix="onnx-obs-") as tmp:
        for loc in _locations(model):
            dst = Path(tmp) / loc
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(base_dir).resolve() / loc, dst)
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return ort.InferenceSession(str(path), opts, providers=providers)


def _locations(model) -> set[str]:
    from onnx_obs.graph.model_io import iter_tensors

    return {e.value for t in iter_tensors(model.graph)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


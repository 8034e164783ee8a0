"""Sequential capture in one pass: each wave runs only its graph slice on cached boundary tensors.

`SlicedCapture(loaded, waves, cal, device)` plans the slices (graph/slicing.py) once; `capture(i)`
builds wave i's slice session on the model as it is now (waves < i pruned), runs it on every
calibration batch with the cached tensors it reads, streams wave i's activations into Hessian
sums and caches the boundary tensors later waves read (`BoundaryCache`: held in memory up to a
budget, spilled to .npy files beyond it). onnxruntime thus does about one forward pass of the
calibration data in all, whatever the depth. The Hessians equal those of capturing each wave on
the whole pruned model, up to onnxruntime fusing ops across a cut in a different order.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from onnx_obs.calib import Calibration
from onnx_obs.graph.model_io import LoadedModel
from onnx_obs.graph.sites import Site
from onnx_obs.graph.slicing import Unsliceable, plan_slices, slice_model
from onnx_obs.hessian.capture import HessianSums
from onnx_obs.runtime import Runner
from onnx_obs.timing import Phases


class BoundaryCache:
    """Tensors by (batch, name): in memory up to `budget` bytes, then in .npy files (one per
    tensor and batch) in a temporary folder removed by `close()`."""

    def __init__(self, budget: int):
        self.budget, self.held, self.peak, self.spilled = budget, 0, 0, 0
        self.memory: dict[tuple[int, str], np.ndarray] = {}
        self.files: dict[tuple[int, str], str] = {}
        self._dir: tempfile.TemporaryDirectory | None = None

    def put(self, batch: int, name: str, value: np.ndarray) -> None:
        if self.held + value.nbytes <= self.budget:
            self.memory[batch, name] = value
            self.held += value.nbytes
            self.peak = max(self.peak, self.held)
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="onnx-obs-boundary-")
        path = os.path.join(self._dir.name, f"{len(self.files)}-{batch}.npy")
        np.save(path, value, allow_pickle=False)
        self.files[batch, name] = path
        self.spilled += value.nbytes

    def get(self, batch: int, name: str) -> np.ndarray:
        if (batch, name) in self.memory:
            return self.memory[batch, name]
        return np.load(self.files[batch, name], allow_pickle=False)

    def drop(self, name: str, batches: int) -> None:
        for b in range(batches):
            value = self.memory.pop((b, name), None)
            if value is not None:
                self.held -= value.nbytes
            path = self.files.pop((b, name), None)
            if path is not None:
                os.remove(path)

    def close(self) -> None:
        self.memory.clear()
        self.files.clear()
        self.held = 0
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class SlicedCapture:
    """waves: the sites of each wave, shallowest first. Raises Unsliceable (from the constructor or
    `capture`) when the graph cannot be cut; the caller then captures on the whole model."""

    def __init__(self, loaded: LoadedModel, waves: list[list[Site]], cal: Calibration, device: str,
                 memory_budget: int, phases: Phases | None = None, max_positions: int | None = 0,
                 precision: str = "float32"):
        self.loaded, self.waves, self.cal, self.device = loaded, waves, cal, device
        self.phases, self.max_positions, self.precision = phases or Phases(), max_positions, precision
        self.fed = set(cal.batches[0])
        changing = {s.tensor_name: i for i, wave in enumerate(waves) for s in wave}
        targets = [sorted({u.activation for s in wave for u in s.uses}) for wave in waves]
        self.plans = plan_slices(loaded.model.graph, self.fed, targets, changing)
        self.cache = BoundaryCache(memory_budget)

    def capture(self, i: int, hessians: bool = True) -> dict[str, np.ndarray]:
        """Wave i's Hessians, by site name, on the model as pruned so far (waves < i); with
        hessians=False (the caller has them) only the boundary tensors later waves read, and {}."""
        plan, sums = self.plans[i], HessianSums(self.waves[i], max_positions=self.max_positions,
                                                precision=self.precision, samples=self.cal.num_samples)
        runner = None
        if plan.nodes:
            with self.phases("capture"):
                dtypes = {t: self._get(0, t).dtype for t in plan.inputs}
                runner = Runner(slice_model(self.loaded.model, plan, dtypes), self.loaded.base_dir,
                                self.device)  # prepacked, as HessianCapture's
        for b in range(len(self.cal.batches)):
            with self.phases("capture"):
                values = {t: self._get(b, t) for t in plan.inputs}
                if runner is not None:
                    outs = runner.run(values, plan.outputs)
                    if not all(isinstance(v, np.ndarray) for v in outs):
                        raise Unsliceable("a boundary tensor is not a tensor (a sequence or map)")
                    values.update(zip(plan.outputs, outs))
                for t in plan.keep:
                    self.cache.put(b, t, values[t])
            if hessians:
                with self.phases("hessians"):
                    sums.add_values(values)
        for t in plan.drop:
            self.cache.drop(t, len(self.cal.batches))
        return sums.hessians() if hessians else {}

    def _get(self, batch: int, name: str) -> np.ndarray:
        return self.cal.batches[batch][name] if name in self.fed else self.cache.get(batch, name)

    def close(self) -> None:
        self.cache.close()

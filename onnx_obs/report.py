"""The prune report: per-site figures and totals, as JSON and as a printed summary."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field

from onnx_obs import __version__
from onnx_obs.timing import Phases


@dataclass
class SiteReport:
    name: str
    op: str
    matrix_shape: tuple[int, int]
    params: int
    zeros_before: int
    zeros_after: int
    method: str
    solver: str = ""
    predicted_error: float | None = None   # sum of saliencies (layer-wise error units)
    measured_error: float | None = None    # mean ||W x - W' x||^2 over the calibration inputs
    damping: float | None = None
    seconds: float = 0.0
    # --allocation auto: the site's chosen level, output sensitivity and predicted output error
    target_sparsity: float | None = None
    sensitivity: float | None = None         # relative output MSE per unit of layer error
    predicted_output_error: float | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros_after / self.params if self.params else 0.0


_ALLOCATION_FIELDS = ("target_sparsity", "sensitivity", "predicted_output_error")


@dataclass
class Report:
    command: str
    method: str
    settings: dict
    sites: list[SiteReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed on stderr: the result may be bad
    deviation: dict = field(default_factory=dict)
    model_params: int = 0          # all float weights of the model, selected or not
    file_size_before: int = 0
    file_size_after: int | None = None
    compressed_size: dict = field(default_factory=dict)  # deflate-compressed bytes before/after
    device: str = ""
    calibration_samples: int = 0
    wall_seconds: float = 0.0
    full_network: dict = field(default_factory=dict)  # full-network OBS: global figures
    structure: list[dict] = field(default_factory=list)  # structured: units per producer layer
    storage: list[dict] = field(default_factory=list)    # --storage: dense/sparse per tensor
    costs: dict = field(default_factory=dict)            # params, MACs, latency before/after
    quantization: list[dict] = field(default_factory=list)  # --bits: grid and errors per site
    activations: list[dict] = field(default_factory=list)   # --activations int8: grid per tensor
    phases: Phases = field(default_factory=Phases)       # seconds per phase (timing.PHASES)
    threads: int = 0                                     # BLAS and onnxruntime threads used
    allocation: dict = field(default_factory=dict)       # --allocation auto: global figures

    @property
    def params_before(self) -> int:
        return sum(s.params - s.zeros_before for s in self.sites)

    @property
    def params_after(self) -> int:
        return sum(s.params - s.zeros_after for s in self.sites)

    def to_dict(self) -> dict:
        sites = []
        for s in self.sites:
            d = {k: v for k, v in asdict(s).items() if v is not None or k not in _ALLOCATION_FIELDS}
            d["sparsity"] = s.sparsity
            d["weights_removed"] = s.zeros_after - s.zeros_before
            sites.append(d)
        site_params = sum(s.params for s in self.sites)
        return {
            "tool": "onnx-obs",
            "version": __version__,
            "command": self.command,
            "method": self.method,
            "settings": self.settings,
            "device": self.device,
            "calibration_samples": self.calibration_samples,
            "sites": sites,
            "skipped": self.skipped,
            "notes": self.notes,
            **({"warnings": self.warnings} if self.warnings else {}),
            "deviation": self.deviation,
            **({"full_network": self.full_network} if self.full_network else {}),
            **({"structure": self.structure} if self.structure else {}),
            **({"storage": self.storage} if self.storage else {}),
            **({"costs": self.costs} if self.costs else {}),
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"allocation": self.allocation} if self.allocation else {}),
            **({"activations": self.activations} if self.activations else {}),
            "totals": {
                "sites": len(self.sites),
                "site_params": site_params,
                "nonzero_params_before": self.params_before,
                "nonzero_params_after": self.params_after,
                "model_params": self.model_params,
                "model_nonzero_after": self.model_params - (site_params - self.params_after),
                "sparsity": 1 - self.params_after / site_params if site_params else 0.0,
                "file_size_before": self.file_size_before,
                "file_size_after": self.file_size_after,
                **({"compressed_size": self.compressed_size} if self.compressed_size else {}),
                "wall_seconds": self.wall_seconds,
                "phase_seconds": self.phases.ordered(),
                "threads": self.threads,
                "peak_memory_mb": peak_memory_mb(),
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)


def peak_memory_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

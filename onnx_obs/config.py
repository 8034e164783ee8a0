"""Every setting of a prune in one object, `PruneConfig`: joined from the groups of
setting_groups.py, validated and reported here.

The Python API takes a PruneConfig (or keyword overrides of one), the CLI builds one from its
options, and `--config FILE.toml` loads one from a file: top-level keys for the top-level settings,
a table per group (`[selection]`, `[data]`, `[layerwise]`, `[full]`, `[structured]`,
`[quantize]`) for the rest;
any setting may also be given by its plain name at the top level (`damp = 0.02`).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from onnx_obs.algorithms.layerwise import METHODS, SOLVERS
from onnx_obs.algorithms.quantize import BITS, QUANT_METHODS
from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.ops import OPS
from onnx_obs.graph.sparse_storage import MODES as STORAGES
from onnx_obs.hessian.layerwise import PRECISIONS
from onnx_obs.setting_groups import (  # noqa: F401  (the groups are part of config's API)
    SCOPES,
    HESSIANS,
    FULL_METHODS,
    GRADIENTS,
    AUTO_ALPHA,
    STRUCTURES,
    STRUCTURED_METHODS,
    ALLOCATIONS,
    MIN_PARAMS,
    QUANT_FORMATS,
    ACTIVATIONS,
    ACTIVATION_CALIBRATIONS,
    GROUPS,
    Selection,
    DataOptions,
    LayerwiseOptions,
    FullOptions,
    StructureOptions,
    QuantOptions,
)


@dataclass
class PruneConfig:
    """What to prune, how, and how to write it. See the CLI's `prune --help` for each setting."""

    method: str = "obs"
    sparsity: float = 0.5
    pattern: tuple[int, int] | None = None   # N:M, overrides sparsity
    scope: str = "layer"                     # "global": rank all sites together (magnitude)
    hessian: str = "layerwise"               # or "full" / "fisher": full-network OBS
    storage: str = "dense"                   # or "sparse" / "auto"
    device: str = "auto"
    threads: int = 0                         # BLAS and onnxruntime threads; 0: the free cores
    selection: Selection = field(default_factory=Selection)
    data: DataOptions = field(default_factory=DataOptions)
    layerwise: LayerwiseOptions = field(default_factory=LayerwiseOptions)
    full: FullOptions = field(default_factory=FullOptions)
    structured: StructureOptions = field(default_factory=StructureOptions)
    quantize: QuantOptions = field(default_factory=QuantOptions)

    @property
    def mode(self) -> str:
        """The strategy that carries out this config (strategies.STRATEGIES)."""
        if self.structured.structure is not None:
            return "structured"
        if self.quantize.bits is not None:
            return "quantize"
        if self.hessian != "layerwise":
            return "full_network"
        return "magnitude" if self.method == "magnitude" else "layerwise"

    @property
    def allocation_used(self) -> str:
        """The allocation a prune runs with: the one asked for, or by default (allocation None) auto
        where it applies (unstructured layer-wise pruning with a Hessian, a sparsity the per-site
        cap can reach) and uniform elsewhere (N:M, structured, full-network, magnitude, quantize)."""
        lw = self.layerwise
        if lw.allocation is not None:
            return lw.allocation
        return "auto" if self._allocation_blocker() is None and 0 < self.sparsity <= lw.max_layer_sparsity else "uniform"

    def _allocation_blocker(self) -> str | None:
        """The setting that rules auto allocation out, as a flag, or None."""
        if self.pattern is not None:
            return "--pattern"
        return {"structured": "--structure", "quantize": "--bits", "magnitude": "--method magnitude",
                "full_network": f"--hessian {self.hessian}"}.get(self.mode)

    def replace(self, **overrides) -> PruneConfig:
        """A copy with settings changed by name: a top-level setting, a group (selection=
        Selection(...)) or any group's field by its own name (damp=0.02, alpha=1e-5)."""
        top = {k: GROUPS[k]() if k in GROUPS and v is None else v  # a group of None: its defaults
               for k, v in overrides.items() if k in _TOP}
        unknown = [k for k in overrides if k not in _TOP and k not in _FIELD_GROUP]
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r}")
        new = dataclasses.replace(self, **top)
        for name, value in overrides.items():
            if name in _FIELD_GROUP:
                group = _FIELD_GROUP[name]
                setattr(new, group, dataclasses.replace(getattr(new, group), **{name: value}))
        return new

    def validate(self, has_calibration: bool) -> None:
        """Refuse bad settings before any work, with one line naming the flag to change."""
        if self.selection.min_params < 0:
            raise OnnxObsError(f"--min-params must be at least 0, got {self.selection.min_params}")
        self._check_method(has_calibration)
        self._check_structured()
        self._check_full()
        self._check_quantize(has_calibration)
        if self.layerwise.damp < 0:
            raise OnnxObsError(f"--damp must be at least 0, got {self.layerwise.damp}")
        if self.layerwise.solver not in SOLVERS:
            raise OnnxObsError(f"unknown solver '{self.layerwise.solver}': use one of {', '.join(SOLVERS)}")
        if not self.layerwise.time_budget >= 0:
            raise OnnxObsError(f"--time-budget must be at least 0 s, got {self.layerwise.time_budget}")
        if self.layerwise.max_positions is not None and self.layerwise.max_positions < 0:
            raise OnnxObsError(f"--max-positions must be at least 0 (0: all), got {self.layerwise.max_positions}")
        if self.layerwise.hessian_precision not in PRECISIONS:
            raise OnnxObsError(f"unknown --hessian-precision '{self.layerwise.hessian_precision}': "
                               f"use one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise OnnxObsError(f"--threads must be at least 0 (0: the free cores), got {self.threads}")
        if self.layerwise.capture_memory_mb < 0:
            raise OnnxObsError(f"--capture-memory must be at least 0 MB, got {self.layerwise.capture_memory_mb}")
        if self.layerwise.block_size < 1:
            raise OnnxObsError(f"--block-size must be at least 1, got {self.layerwise.block_size}")
        self._check_allocation()

    def _check_allocation(self) -> None:
        lw = self.layerwise
        if lw.allocation is not None and lw.allocation not in ALLOCATIONS:
            raise OnnxObsError(f"unknown allocation '{lw.allocation}': use one of {', '.join(ALLOCATIONS)}")
        capped = lw.max_layer_sparsity != LayerwiseOptions.max_layer_sparsity
        if lw.allocation == "uniform":
            if capped:
                raise OnnxObsError("--max-layer-sparsity caps the per-site levels of --allocation auto: "
                                   "drop --allocation uniform, or drop --max-layer-sparsity")
            return
        blocker = self._allocation_blocker()
        if lw.allocation is None and blocker is not None and not capped:
            return  # uniform: auto allocation does not apply and was not asked for
        if blocker is not None:
            if lw.allocation is None:
                raise OnnxObsError(f"--max-layer-sparsity caps the per-site levels of auto allocation, "
                                   f"which {blocker} does not use: drop --max-layer-sparsity")
            raise OnnxObsError(f"--allocation auto chooses per-site levels of unstructured layer-wise pruning "
                               f"from their Hessians, which {blocker} does not use: drop --allocation auto"
                               + (" (--scope global ranks magnitudes across sites)" if blocker == "--method magnitude" else ""))
        if not 0 < lw.max_layer_sparsity <= 1:
            raise OnnxObsError(f"--max-layer-sparsity must be in (0, 1], got {lw.max_layer_sparsity}")
        if self.sparsity > lw.max_layer_sparsity and (lw.allocation == "auto" or capped):
            raise OnnxObsError(f"--sparsity {self.sparsity} is above --max-layer-sparsity "
                               f"{lw.max_layer_sparsity}: no allocation can reach it; raise the cap")

    def _check_method(self, has_calibration: bool) -> None:
        method, pattern, scope = self.method, self.pattern, self.scope
        if method not in METHODS:
            raise OnnxObsError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
        if not 0 <= self.sparsity < 1:
            raise OnnxObsError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if pattern is not None:
            n, m = pattern
            if not 0 < n < m:
                raise OnnxObsError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        if scope not in SCOPES:
            raise OnnxObsError(f"unknown scope '{scope}': use one of {', '.join(SCOPES)}")
        if scope == "global" and method != "magnitude":
            raise OnnxObsError("--scope global ranks weights of different layers against each other, "
                               "which only magnitude supports: use --method magnitude or --scope layer")
        if scope == "global" and pattern is not None:
            raise OnnxObsError("--pattern applies per layer: drop --scope global")
        prunes = self.quantize.bits is None or self.sparsity > 0 or pattern is not None
        if method != "magnitude" and prunes and not has_calibration:
            raise OnnxObsError(f"--method {method} needs calibration data: pass --calib DATA.npz")

    def _check_structured(self) -> None:
        s = self.structured
        if self.storage not in STORAGES:
            raise OnnxObsError(f"unknown storage '{self.storage}': use one of {', '.join(STORAGES)}")
        targets = [t for t in (s.target_params, s.target_flops, s.target_speedup, s.target_latency_ms)
                   if t is not None]
        if targets and s.structure is None:
            raise OnnxObsError("--target-params/--target-flops/--target-speedup/--target-latency-ms "
                               "set the size of a "
                               "structured prune: "
                               "add --structure neurons (or channels)")
        if s.latency not in ("macs", "measured"):
            raise OnnxObsError(f"--latency must be macs or measured, got '{s.latency}'")
        if s.structure is None:
            return
        if s.structure not in STRUCTURES:
            raise OnnxObsError(f"unknown structure '{s.structure}': use neurons or channels")
        if self.method not in STRUCTURED_METHODS:
            raise OnnxObsError(f"--structure works with --method obs (group OBS with correction) or "
                               f"magnitude (L1 norm of rows, no correction), not {self.method}")
        if self.hessian != "layerwise":
            raise OnnxObsError("--structure uses layer-wise Hessians of the consumer layers: drop "
                               f"--hessian {self.hessian}")
        if self.pattern is not None or self.scope != "layer":
            raise OnnxObsError("--pattern and --scope global apply to single weights: drop them "
                               "with --structure")
        if len(targets) > 1:
            raise OnnxObsError("give one of --target-params, --target-flops, --target-speedup and "
                               "--target-latency-ms, not both (or more)")
        if targets and not targets[0] > 0:
            raise OnnxObsError(f"the target must be a positive number, got {targets[0]}")
        if s.target_speedup is not None and not s.target_speedup > 1:
            raise OnnxObsError(f"--target-speedup is how many times fewer MACs to reach: give a "
                               f"number above 1, got {s.target_speedup}")

    def _check_full(self) -> None:
        hessian, method, options = self.hessian, self.method, self.full
        if hessian not in HESSIANS:
            raise OnnxObsError(f"unknown --hessian '{hessian}': use one of {', '.join(HESSIANS)}")
        if hessian == "layerwise":
            changed = [f.name for f in dataclasses.fields(FullOptions)
                       if getattr(options, f.name) != getattr(FullOptions(), f.name)]
            if changed:
                raise OnnxObsError(f"--{changed[0].replace('_', '-')} applies to full-network pruning: "
                                   "add --hessian full, or drop it")
            return
        if method not in FULL_METHODS:
            raise OnnxObsError(f"--hessian {hessian} supports --method {', '.join(FULL_METHODS)}, not {method}")
        if self.pattern is not None:
            raise OnnxObsError(f"--pattern is per layer: --hessian {hessian} prunes one global pool; drop --pattern")
        if hessian == "fisher" and self.data.labels is None:
            raise OnnxObsError("--hessian fisher needs targets for its loss gradients: pass --labels KEY "
                               "(without labels, use --hessian full)")
        if options.gradients not in GRADIENTS:
            raise OnnxObsError(f"unknown --gradients '{options.gradients}': use one of {', '.join(GRADIENTS)}")
        if options.alpha is not None and not options.alpha > 0:
            raise OnnxObsError(f"--alpha must be positive, got {options.alpha}")
        if options.step < 1:
            raise OnnxObsError(f"--step must be at least 1, got {options.step}")
        if options.recompute_every is not None and options.recompute_every < 1:
            raise OnnxObsError(f"--recompute-every must be at least 1, got {options.recompute_every}")
        if options.recompute_every is not None and method != "obs":
            raise OnnxObsError("--recompute-every rebuilds OBS's inverse Hessian: use it with --method obs")
        if options.save_gradient_graph is not None and (options.gradients == "fd" or method == "magnitude"):
            raise OnnxObsError("--save-gradient-graph needs gradients by a graph: drop --gradients fd "
                               "and use --method obs or obd")
        bound = options.error_bound
        if bound is not None:
            if method == "magnitude":
                raise OnnxObsError("--max-error-increase needs a predicted error: use --method obs or obd")
            if bound[0] == "relative" and self.data.labels is None:
                raise OnnxObsError("--max-error-increase in % is relative to the current error E0, which is 0 "
                                   "without labels (the targets are the model's own outputs): pass --labels KEY "
                                   "or an absolute bound")

    def _check_quantize(self, has_calibration: bool) -> None:
        q = self.quantize
        if q.bits is None:
            changed = [f.name for f in dataclasses.fields(QuantOptions)
                       if getattr(q, f.name) != getattr(QuantOptions(), f.name)]
            if changed:
                flag = "method" if changed[0] == "quant_method" else changed[0].replace("_", "-")
                raise OnnxObsError(f"quantization setting {flag} needs --bits 8 or 4 (or onnx-obs quantize)")
            return
        if q.bits not in BITS:
            raise OnnxObsError(f"--bits must be 8 or 4, got {q.bits}")
        if q.group_size != -1 and q.group_size < 1:
            raise OnnxObsError(f"--group-size must be a positive number of input channels or -1 "
                               f"(one scale per output channel), got {q.group_size}")
        if q.quant_method not in QUANT_METHODS:
            raise OnnxObsError(f"unknown quantization method '{q.quant_method}': use one of "
                               f"{', '.join(QUANT_METHODS)}")
        if q.format not in QUANT_FORMATS:
            raise OnnxObsError(f"unknown --format '{q.format}': use one of {', '.join(QUANT_FORMATS)}")
        if q.format == "matmulnbits" and q.bits != 4:
            raise OnnxObsError("--format matmulnbits stores 4-bit weights: use --bits 4 (or --format qdq)")
        if q.activations not in ACTIVATIONS:
            raise OnnxObsError(f"unknown --activations '{q.activations}': use one of {', '.join(ACTIVATIONS)}")
        if q.activation_calibration not in ACTIVATION_CALIBRATIONS:
            raise OnnxObsError(f"unknown --activation-calibration '{q.activation_calibration}': use one of "
                               f"{', '.join(ACTIVATION_CALIBRATIONS)}")
        if not 50 < q.activation_percentile <= 100:
            raise OnnxObsError(f"--activation-percentile must be in (50, 100], got {q.activation_percentile:g}")
        if q.activations == "int8":
            if q.bits != 8 or q.format != "qdq":
                raise OnnxObsError("--activations int8 runs onnxruntime's int8 kernels: use --bits 8 "
                                   "--format qdq")
            if not has_calibration:
                raise OnnxObsError("--activations int8 takes its activation scales from calibration data: "
                                   "pass --calib DATA.npz")
        elif (q.activation_calibration, q.activation_percentile) != ("minmax", 99.99):
            raise OnnxObsError("--activation-calibration and --activation-percentile need --activations int8")
        if q.quant_method != "rtn" and not has_calibration:
            raise OnnxObsError(f"quantizing with {q.quant_method} needs calibration data for its "
                               "Hessians: pass --calib DATA.npz (or use --method rtn)")
        if q.act_order and q.quant_method not in ("gptq", "auto"):
            raise OnnxObsError("--act-order orders GPTQ's columns: use it with --method gptq")
        if self.structured.structure is not None or self.hessian != "layerwise":
            raise OnnxObsError("--bits quantizes after layer-wise pruning: drop --structure and "
                               "--hessian full/fisher")
        if self.storage != "dense":
            raise OnnxObsError("--storage sparse stores float zeros; quantized weights are stored as "
                               "integers: drop --storage")

    def report_settings(self) -> dict:
        """The settings as the report's JSON shows them."""
        lw, data, s = self.layerwise, self.data, self.structured
        settings = dict(
            sparsity=self.sparsity, pattern=f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None,
            scope=self.scope, solver=lw.solver, time_budget=lw.time_budget,
            max_positions="auto" if lw.max_positions is None else lw.max_positions, hessian_precision=lw.hessian_precision,
            block_size=lw.block_size, damp=lw.damp,
            sequential=lw.sequential, batch_size=data.batch_size, max_samples=data.max_samples,
            batching=data.batching, allocation=self.allocation_used)
        if self.allocation_used == "auto":
            settings.update(max_layer_sparsity=lw.max_layer_sparsity)
        if s.structure is not None or self.storage != "dense":
            settings.update(structure=s.structure, target_params=s.target_params,
                            target_flops=s.target_flops, target_speedup=s.target_speedup,
                            target_latency_ms=s.target_latency_ms, latency=s.latency,
                            storage=self.storage)
        if self.quantize.bits is not None:
            settings.update(dataclasses.asdict(self.quantize))
        if self.hessian != "layerwise":
            f = self.full
            settings.update(hessian=self.hessian, alpha=f.alpha, step=f.step,
                            max_error_increase=f.max_error_increase, recompute_every=f.recompute_every,
                            prune_biases=f.prune_biases, gradients=f.gradients)
        return settings

    @classmethod
    def from_toml(cls, path: str | Path) -> PruneConfig:
        """Settings from a TOML file (see the module docstring)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise OnnxObsError(f"cannot read the config file {path}: {e.strerror or e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise OnnxObsError(f"{path} is not valid TOML: {e}") from e
        flat = {}
        for key, value in data.items():
            if key in GROUPS and isinstance(value, dict):
                fields = {f.name for f in dataclasses.fields(GROUPS[key])}
                for k, v in value.items():
                    if k not in fields:
                        raise OnnxObsError(f"{path}: unknown setting '{k}' in [{key}]: use one of "
                                           f"{', '.join(sorted(fields))}")
                    flat[k] = v
            elif key in _TOP or key in _FIELD_GROUP:
                flat[key] = value
            else:
                raise OnnxObsError(f"{path}: unknown setting '{key}' (see onnx-obs prune --help)")
        return cls().replace(**{k: _typed(k, v, path) for k, v in flat.items()})


_TOP = {f.name for f in dataclasses.fields(PruneConfig)}
_FIELD_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
_HINTS = {name: typing.get_type_hints(cls)[name] for name, cls in
          [(n, PruneConfig) for n in _TOP - set(GROUPS)]
          + [(n, GROUPS[g]) for n, g in _FIELD_GROUP.items()]}


def _typed(name: str, value, path) -> object:
    """A TOML value as the setting's type (pattern "2:4" -> (2, 4), op_types "Conv,Gemm" -> list),
    or a one-line error."""
    if name == "pattern" and isinstance(value, (str, list)):
        return parse_pattern(value) if isinstance(value, str) else tuple(value)
    if name == "op_types" and isinstance(value, str):
        return parse_op_types(value)
    allowed = typing.get_args(_HINTS[name]) if isinstance(_HINTS[name], types.UnionType) else (_HINTS[name],)
    allowed = tuple(typing.get_origin(t) or t for t in allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if value is None or (isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)):
        return value
    raise OnnxObsError(f"{path}: setting '{name}' must be {_HINTS[name]}, got {value!r}")


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise OnnxObsError(f"--pattern must look like N:M (e.g. 2:4), got '{text}'") from None
    return n, m


def parse_op_types(text: str | None) -> list[str] | None:
    """A comma list of site op types, in any case ("conv,gemm"), as ONNX spells them."""
    if not text:
        return None
    known = {o.lower(): o for o in OPS}
    names = [o.strip() for o in text.split(",") if o.strip()]
    for o in names:
        if o.lower() not in known:
            raise OnnxObsError(f"--op-types: '{o}' is not an op type with prunable weights: use "
                               f"{', '.join(OPS)}")
    return [known[o.lower()] for o in names] or None

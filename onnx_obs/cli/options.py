"""Options shared by several commands, each defined once, and how they become a PruneConfig.

Commands list the options they take by these names (as Polygraphy's argument groups); the help
shows them in panels. `prune_config` turns a command's parsed options into the settings object,
starting from `--config FILE.toml` when one is given: then only the options typed on the command
line override the file.
"""

from __future__ import annotations

from pathlib import Path

import typer

from onnx_obs.config import MIN_PARAMS, PruneConfig, parse_op_types, parse_pattern

SELECT, DATA, METHOD, SOLVER = "Selection", "Data", "Method", "Layer-wise OBS"
FULL, STRUCT, OUTPUT = "Full-network OBS", "Structured removal", "Output"
TIMING, CHECKS = "Timing", "Checks"
QUANT = "Quantization"

ConfigOpt = typer.Option(None, "--config", help="Read the settings from this TOML file (keys as the options without dashes, e.g. sparsity = 0.6, or in the tables selection, data, layerwise, full, structured and quantize); options given on the command line override it.")
IncludeOpt = typer.Option(None, "--include", help="Only sites whose tensor or node name matches this regex.", rich_help_panel=SELECT)
ExcludeOpt = typer.Option(None, "--exclude", help="Skip sites whose tensor or node name matches this regex.", rich_help_panel=SELECT)
OpTypesOpt = typer.Option(None, "--op-types", help="Comma-separated op types to prune, e.g. Conv,Gemm.", rich_help_panel=SELECT)
NoBatchingOpt = typer.Option(False, "--no-batching", help="Feed the arrays whole instead of slicing axis 0 into batches, for inputs not batched on axis 0 (scalars, recurrent states): one onnxruntime run per .npz of a directory (by name), per KEY__0, KEY__1, ... group of an .npz, or per plain file. Shapes are checked on every axis; samples count runs.", rich_help_panel=DATA)
BatchSizeOpt = typer.Option(32, "--batch-size", help="Samples per onnxruntime run.", rich_help_panel=DATA)
MaxSamplesOpt = typer.Option(None, "--max-samples", help="Use at most this many calibration samples.", rich_help_panel=DATA)
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda (onnxruntime-gpu).")
ThreadsOpt = typer.Option(0, "--threads", help="Threads for numpy's BLAS and onnxruntime; 0: the cores this process may use (affinity, cgroup quota) that are idle when the run starts.")
TimeBudgetOpt = typer.Option(10.0, "--time-budget", help="With --solver auto: seconds of exact solves for the whole run (modelled from layer sizes, so the output does not depend on the machine); they go to the layers with the most predicted output error per second (with --allocation auto; else the smallest first), the rest get fast + refit.", rich_help_panel=SOLVER)
MaxPositionsOpt = typer.Option(None, "--max-positions", help="Convolution Hessians from at most this many output positions per calibration sample (a seeded random subset); 0: all. Default: enough for 64 input vectors per weight column over the calibration set.", show_default=False, rich_help_panel=SOLVER)
HessianPrecisionOpt = typer.Option("float32", "--hessian-precision", help="Products x^T x of float32 activations in float32 BLAS (faster; chunks of 4096 rows summed in float64, about 1e-6 relative error in H) or float64. float64 models always use float64.", rich_help_panel=SOLVER)
CaptureMemoryOpt = typer.Option(2048, "--capture-memory", help="Sequential capture: MB of boundary tensors (the outputs one graph slice passes to the next, for the whole calibration set) held in memory; beyond it they go to temporary files.", rich_help_panel=SOLVER)
PatternOpt = typer.Option(None, "--pattern", help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity).", rich_help_panel=METHOD)
SolverOpt = typer.Option("auto", "--solver", help="OBS solver: exact (OBC), fast (SparseGPT), or auto: exact where it costs about 2 s or less per layer, else fast with a least-squares refit of the kept weights where that costs about 2 s or less.", rich_help_panel=SOLVER)
GroupSizeOpt = typer.Option(-1, "--group-size", help="Input channels per scale (e.g. 32, 64, 128; blocked DequantizeLinear, opset 21); -1: one scale per output channel.", rich_help_panel=QUANT)
SymmetricOpt = typer.Option(True, "--symmetric/--asymmetric", help="Signed codes with zero point 0, or unsigned codes with a zero point per scale.", rich_help_panel=QUANT)
ActOrderOpt = typer.Option(False, "--act-order", help="GPTQ: quantize columns by decreasing diag(H) instead of left to right.", rich_help_panel=QUANT)
FormatOpt = typer.Option("qdq", "--format", help="qdq: int8/int4 initializers + DequantizeLinear feeding the original op; matmulnbits: onnxruntime's com.microsoft MatMulNBits for MatMul/Gemm weights at 4 bits (its fast CPU kernels), other weights qdq.", rich_help_panel=OUTPUT)
AllocationOpt = typer.Option(None, "--allocation", help="uniform: every site at --sparsity; auto: per-site levels that meet --sparsity over all selected weights at least predicted output error (each layer's error table from the OBS solver, scaled by a measured output sensitivity; unstructured layer-wise methods with a Hessian). Default: auto for unstructured layer-wise pruning (obs, obd, wanda), uniform for --pattern, --structure, --hessian full/fisher, magnitude and --bits.", rich_help_panel=METHOD)
MaxLayerSparsityOpt = typer.Option(0.9, "--max-layer-sparsity", help="With auto allocation: no site gets more than this fraction of zeros.", rich_help_panel=METHOD)
ActivationsOpt = typer.Option("none", "--activations", help="int8: also quantize the quantized sites' inputs and outputs (uint8 QuantizeLinear/DequantizeLinear pairs, scales from the calibration data) so onnxruntime runs integer kernels (QLinearConv, QLinearMatMul, QGemm); needs --bits 8 --format qdq. none: weights only.", rich_help_panel=QUANT)
ActivationCalibrationOpt = typer.Option("minmax", "--activation-calibration", help="With --activations int8: minmax (the full range seen) or percentile (the range between the --activation-percentile tails, outliers clipped).", rich_help_panel=QUANT)
ActivationPercentileOpt = typer.Option(99.99, "--activation-percentile", help="With --activation-calibration percentile: the upper percentile kept (the lower is 100 minus it).", rich_help_panel=QUANT)
DampOpt = typer.Option(0.01, "--damp", help="Hessian damping, as a fraction of mean diag(H).", rich_help_panel=SOLVER)
MinParamsOpt = typer.Option(MIN_PARAMS, "--min-params", help="Keep sites with fewer weights than this dense (listed as skipped) when the model has larger ones: tiny layers save nothing and are often fixed transforms. 0 prunes every site.", rich_help_panel=SELECT)
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print nothing but warnings and errors (and JSON asked for with --json -).", rich_help_panel=OUTPUT)
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also print a progress line on stderr for every step (site, run, batch).", rich_help_panel=OUTPUT)
ReportOpt = typer.Option(None, "--report", "--json", metavar="[FILE.json|-]", help="Write the JSON report to this file, or to stdout with - (or --json alone; the summary is then not printed).", rich_help_panel=OUTPUT)
JsonOpt = typer.Option(None, "--json", metavar="[FILE.json|-]", help="Write the results as JSON: to FILE.json, or to stdout when given alone or as -.", rich_help_panel=OUTPUT)

# A command's option (parameter name) -> (setting of PruneConfig.replace, how its value converts)
_SETTINGS = {
    "method": ("method", None), "sparsity": ("sparsity", None), "pattern": ("pattern", parse_pattern),
    "scope": ("scope", None), "hessian": ("hessian", None), "storage": ("storage", None),
    "device": ("device", None), "threads": ("threads", None),
    "capture_memory": ("capture_memory_mb", None), "time_budget": ("time_budget", None),
    "max_positions": ("max_positions", None), "hessian_precision": ("hessian_precision", None),
    "include": ("include", None), "exclude": ("exclude", None), "op_types": ("op_types", parse_op_types),
    "min_params": ("min_params", None),
    "batch_size": ("batch_size", None), "max_samples": ("max_samples", None),
    "labels": ("labels", None), "no_batching": ("batching", lambda v: not v),
    "solver": ("solver", None), "block_size": ("block_size", None), "damp": ("damp", None),
    "sequential": ("sequential", None),
    "allocation": ("allocation", None), "max_layer_sparsity": ("max_layer_sparsity", None),
    "alpha": ("alpha", None), "max_error_increase": ("max_error_increase", None),
    "recompute_every": ("recompute_every", None), "step": ("step", None),
    "prune_biases": ("prune_biases", None), "gradients": ("gradients", None),
    "save_gradient_graph": ("save_gradient_graph", None),
    "structure": ("structure", None), "target_params": ("target_params", None),
    "target_flops": ("target_flops", None), "target_speedup": ("target_speedup", None),
    "target_latency_ms": ("target_latency_ms", None), "latency": ("latency", None),
    "bits": ("bits", None), "group_size": ("group_size", None), "symmetric": ("symmetric", None),
    "quant_method": ("quant_method", None), "act_order": ("act_order", None), "format": ("format", None),
    "activations": ("activations", None), "activation_calibration": ("activation_calibration", None),
    "activation_percentile": ("activation_percentile", None),
}


def prune_config(ctx: typer.Context, config_file: Path | None, exclude: tuple[str, ...] = ()) -> PruneConfig:
    """The settings from the command's options (and --config), leaving out `exclude`d options."""
    base = PruneConfig.from_toml(config_file) if config_file is not None else PruneConfig()
    overrides = {}
    for param, value in ctx.params.items():
        if param not in _SETTINGS or param in exclude:
            continue
        typed = ctx.get_parameter_source(param).name not in ("DEFAULT", "DEFAULT_MAP")
        if config_file is None or typed:
            name, convert = _SETTINGS[param]
            overrides[name] = convert(value) if convert else value
    return base.replace(**overrides)

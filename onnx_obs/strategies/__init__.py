"""One strategy per mode of pruning, each a module with `run(ctx)`, chosen once by the config."""

from __future__ import annotations

from types import ModuleType

from onnx_obs.strategies import full_network, layerwise, magnitude, quantize, structured

STRATEGIES: dict[str, ModuleType] = {
    "layerwise": layerwise,        # layer-wise OBS / OBD / wanda with captured Hessians
    "magnitude": magnitude,        # |w| alone, per site or global
    "full_network": full_network,  # the paper's algorithm over all selected weights
    "structured": structured,      # whole units removed, the graph shrunk
    "quantize": quantize,          # weights onto an int8 / int4 grid (after pruning, if asked)
}

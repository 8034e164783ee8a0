"""Sites that prune keeps dense by default, and the warnings inspect flags on each site.

Kept dense unless `--include` names them: sites smaller than `--min-params` (when the model has
larger ones: a model of tiny layers only, such as the paper's XOR network, is pruned in full)
and sites whose weights look like a fixed transform (algorithms/fixed.py).
"""

from __future__ import annotations

import onnx

from onnx_obs.algorithms.fixed import fixed_transform
from onnx_obs.config import Selection
from onnx_obs.graph.sites import Site, site_matrix

# Larger weights are not read to look for fixed transforms (an STFT basis has about 2^18).
FIXED_CHECK_MAX = 1 << 20


def fixed_kind(site: Site, base_dir: str = "") -> str | None:
    """What fixed transform the site's weights look like, or None."""
    return fixed_transform(site_matrix(site, base_dir)) if site.size <= FIXED_CHECK_MAX else None


def too_small(site: Site, sites: list[Site], min_params: int) -> bool:
    """Below min_params while some site of `sites` is not."""
    return site.size < min_params and any(s.size >= min_params for s in sites)


def held_back(sites: list[Site], selection: Selection, base_dir: str = "") -> dict[str, tuple[str, str]]:
    """Site name -> (op type, why prune keeps it dense), for the selected `sites` not named by
    --include."""
    reasons = {}
    for s in sites:
        if selection.names(s):
            continue
        if too_small(s, sites, selection.min_params):
            reasons[s.name] = (s.op_type, f"{s.size} weights, fewer than --min-params "
                               f"{selection.min_params}: kept dense (pass --min-params 0 to prune it)")
        elif (kind := fixed_kind(s, base_dir)) is not None:
            reasons[s.name] = (s.op_type, f"looks like a fixed transform ({kind}): kept dense "
                               "(name it with --include to prune it)")
    return reasons


def site_flags(site: Site, sites: list[Site], model: onnx.ModelProto, selection: Selection,
                  base_dir: str = "") -> list[str]:
    """What inspect flags about a site: kept dense by prune, or feeding a graph output."""
    flags = []
    if too_small(site, sites, selection.min_params):
        flags.append(f"fewer than --min-params {selection.min_params} weights: prune keeps it dense")
    kind = fixed_kind(site, base_dir)
    if kind is not None:
        flags.append(f"looks like a fixed transform ({kind}): prune keeps it dense unless "
                     "--include names it")
    outputs = {o.name for o in model.graph.output}
    fed = sorted({u.output for u in site.uses if not u.in_subgraph and u.output in outputs})
    if fed:
        flags.append(f"feeds the graph output {', '.join(repr(o) for o in fed)} directly: its "
                     "error reaches the model's output unfiltered")
    return flags

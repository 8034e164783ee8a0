"""Full-network OBS, OBD or magnitude (Hassibi & Stork 1992): all selected weights as one pool,
with the network's output Hessian (or the empirical Fisher) from per-sample derivatives
(hessian/network.py). Surgery (Eqs. 5-6) deletes weights across all layers and corrects all the
others; OBD and magnitude rank the same pool without correction.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from onnx_obs.algorithms.surgery import SurgeryResult, global_baseline, obs_surgery
from onnx_obs.calib import Calibration
from onnx_obs.config import FullOptions
from onnx_obs.graph.model_io import LoadedModel
from onnx_obs.graph.sites import Site
from onnx_obs.hessian.inverse import check_fits
from onnx_obs.hessian.network import FullNetwork, Parameters, parameters
from onnx_obs.report import Report, SiteReport
from onnx_obs.strategies.context import Context, drop_uncaptureable

_ALPHA_DOMINATES = 0.1  # warn when alpha is at least this fraction of mean diag(H)


def run(ctx: Context) -> None:
    drop_uncaptureable(ctx)
    c = ctx.config
    prune_full(ctx.loaded, ctx.sites, ctx.cal, method=c.method, sparsity=c.sparsity, hessian=c.hessian,
               options=c.full, bound=c.full.error_bound, device=c.device, report=ctx.report,
               bar=ctx.bar, force=ctx.force)


def prune_full(loaded: LoadedModel, sites: list[Site], cal: Calibration | None, *, method: str,
               sparsity: float, hessian: str, options: FullOptions, bound: tuple[str, float] | None,
               device: str, report: Report, bar, force: bool = False) -> None:
    """Prune the selected sites as one pool (`hessian="full"|"fisher"`).

    Writes the pruned weights into `loaded.model` and fills `report` (per-site rows, notes and
    `report.full_network`).
    """
    params = parameters(loaded.model, sites, loaded.base_dir, options.prune_biases, report.notes)
    w0 = params.read()
    n = params.n
    target = int(round(sparsity * n))
    if method == "obs":
        check_fits(n)  # before any gradient work: H^-1 and the surgery's working copy
    net = None
    if cal is not None:
        net = FullNetwork(loaded, params, cal, hessian=hessian, options=options, device=device,
                          notes=report.notes, force=force)
    limit = None
    if bound is not None:
        limit = bound[1] * net.E0 if bound[0] == "relative" else bound[1]
    t_surgery = 0.0
    if method == "magnitude":
        t0 = time.perf_counter()
        res = global_baseline(w0, "magnitude", target_zeros=target)
        t_surgery = time.perf_counter() - t0
    elif method == "obd":
        diag = net.hessian_diag(bar=bar)
        t0 = time.perf_counter()
        res = global_baseline(w0, "obd", target_zeros=target, hessian_diag=diag)
        if limit is not None and res.error_increase > limit:
            keep = int(np.searchsorted(res.cumulative, limit, side="right"))
            res = global_baseline(w0, "obd", target_zeros=keep, hessian_diag=diag)
            res = replace(res, stop_reason="error")
        t_surgery = time.perf_counter() - t0
    else:
        Hinv = net.inverse(bar=bar)
        _alpha_notes(net, report.notes)
        t0, spent = time.perf_counter(), dict(net.seconds)
        res = obs_surgery(w0, Hinv, target_zeros=target, max_error_increase=limit, step=options.step,
                          recompute=net.recompute if options.recompute_every else None,
                          recompute_every=options.recompute_every, overwrite_hinv=True)
        del Hinv
        t_surgery = time.perf_counter() - t0 - sum(net.seconds[k] - spent[k] for k in spent)
    params.write(res.w)
    if options.save_gradient_graph is not None:
        net.save_gradient_graphs(options.save_gradient_graph)
    _report(report, params, w0, res, net, hessian, method, options, target, limit, t_surgery)


def _alpha_notes(net: FullNetwork, notes: list[str]) -> None:
    a, md = net.options.alpha, net.mean_diag
    ratio = a / md if md else float("inf")
    notes.append(f"alpha {a:g} is {ratio:.3g} x mean diag(H) = {md:.3g}")
    if ratio >= _ALPHA_DOMINATES:
        notes.append(f"warning: alpha dominates H (>= {_ALPHA_DOMINATES:g} x its mean diagonal): saliencies tend to "
                     "magnitude order; lower --alpha")
    vectors = net.P * net.rows_per_sample
    if vectors < net.params.n:
        notes.append(f"H has rank at most {vectors} ({net.P} samples x {net.rows_per_sample}) below its "
                     f"{net.params.n} weights: on the rest alpha alone sets H^-1, where weight changes leave "
                     "the calibration outputs unchanged; more calibration samples constrain it")


def _report(report: Report, params: Parameters, w0: np.ndarray, res: SurgeryResult, net: FullNetwork | None,
            hessian: str, method: str, options: FullOptions, target: int, limit: float | None,
            t_surgery: float) -> None:
    report.method = f"full-network {method}"
    sal = np.zeros(params.n)
    sal[res.order] = res.saliencies
    for s in params.segments:
        before, after = w0[s.slice], res.w[s.slice]
        report.sites.append(SiteReport(
            name=s.name, op=s.op, matrix_shape=s.shape if s.site is not None else (1, s.size),
            params=s.size, zeros_before=int(np.sum(before == 0)), zeros_after=int(np.sum(after == 0)),
            method=report.method, solver="global",
            predicted_error=float(sal[s.slice].sum()) if method != "magnitude" else None))
    summary = {
        "hessian": "empirical Fisher" if hessian == "fisher" else "Gauss-Newton (Eqs. 12-14)",
        "weights": params.n, "biases": sum(s.size for s in params.segments if s.bias is not None),
        "zeros": int(res.order.size), "removed": int(res.order.size - np.sum(w0 == 0)), "target_zeros": target,
        "predicted_error_increase": float(res.error_increase), "error_bound": limit,
        "stop_reason": res.stop_reason, "seconds": {"gradients": 0.0, "inverse": 0.0, "surgery": t_surgery},
    }
    if net is not None:
        after = net.error()
        summary.update(
            gradients=net.mode, samples=net.P, vectors_per_sample=net.rows_per_sample or None,
            targets="labels" if net.cal.labels is not None else "original outputs",
            mean_diag_h=net.mean_diag, error_before=net.E0, error_after=after, measured_error_increase=after - net.E0,
            recomputes=net.recomputes,
        )
        summary["seconds"].update(gradients=net.seconds["gradients"], inverse=net.seconds["inverse"])
        if net.mode == "fd":
            fd = net.differences
            sites = [s.name for s in params.segments if s.site is not None]
            summary["finite_differences"] = dict(reason=net.fd_reason, sites=sites, redone=fd.redone, kinks=fd.kinks)
            report.notes.append(
                f"finite differences along the weights ({net.fd_reason}) for all {len(sites)} sites: "
                f"{', '.join(sites)}; {fd.redone} (sample, weight) pairs redone with smaller steps near a kink, "
                f"{fd.kinks} on a kink (the mean of the one-sided slopes)")
        if method == "obs":
            summary.update(alpha=options.alpha, alpha_over_mean_diag=options.alpha / net.mean_diag if net.mean_diag else None)
    report.full_network = summary
    sec = summary["seconds"]
    text = (f"full-network {method}: {summary['zeros']} of {params.n} weights zero ({summary['removed']} removed "
            f"now; stop: {res.stop_reason}), predicted error increase {res.error_increase:.4g}")
    if net is not None:
        text += f", measured {summary['measured_error_increase']:.4g} (E {net.E0:.4g} -> {summary['error_after']:.4g})"
    text += f"; {sec['gradients']:.2f} s gradients, {sec['inverse']:.2f} s inverse, {sec['surgery']:.2f} s surgery"
    report.notes.append(text)

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
_CHECKPOINTS = 32  # OBS: the error is measured about this many times during surgery
_UNDERESTIMATE = 10  # flag checkpoints where measured > this x predicted
_WARN = 100  # warn on stderr when the final measured increase is > this x the predicted
_RANK_DEFICIT = 0.01  # rank note when this fraction of H's directions have curvature below alpha


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
        _alpha_notes(net, float(np.trace(Hinv)), options.alpha is None, report.notes)
        checks = _Checkpoints(net, params, limit)
        t0, spent = time.perf_counter(), dict(net.seconds)
        res = obs_surgery(w0, Hinv, target_zeros=target, max_error_increase=limit, step=options.step,
                          recompute=net.recompute if options.recompute_every else None,
                          recompute_every=options.recompute_every, checkpoint=checks,
                          checkpoint_every=max(options.step, -(-(target - int(np.sum(w0 == 0))) // _CHECKPOINTS)),
                          overwrite_hinv=True)
        del Hinv
        t_surgery = time.perf_counter() - t0 - sum(net.seconds[k] - spent[k] for k in spent) - checks.seconds
        net.checkpoints = checks
    params.write(res.w)
    if options.save_gradient_graph is not None:
        net.save_gradient_graphs(options.save_gradient_graph)
    _report(report, params, w0, res, net, hessian, method, options, target, limit, t_surgery)


class _Checkpoints:
    """obs_surgery's checkpoint: the error increase measured with onnxruntime on the calibration
    data at the corrected weights, against the bound and against the predicted increase."""

    def __init__(self, net: FullNetwork, params: Parameters, limit: float | None):
        self.net, self.params, self.limit = net, params, limit
        self.points: list[dict] = []
        self.seconds = 0.0

    def __call__(self, w: np.ndarray, predicted: float) -> bool:
        t0 = time.perf_counter()
        self.params.write(w)
        measured = self.net.error() - self.net.E0
        self.points.append(dict(zeros=int(np.sum(w == 0)), predicted=predicted, measured=measured,
                                underestimated=_underestimated(self.net, predicted, measured)))
        self.seconds += time.perf_counter() - t0
        return self.limit is None or measured <= self.limit


def _underestimated(net: FullNetwork, predicted: float, measured: float, factor: float = _UNDERESTIMATE) -> bool:
    """measured > factor x predicted, above float rounding of the error (1e-9 of its scale)."""
    return measured > factor * predicted and measured > 1e-9 * max(net.E0, net.output_energy)


def _alpha_notes(net: FullNetwork, trace: float, from_data: bool, notes: list[str]) -> None:
    a, md, n = net.alpha, net.mean_diag, net.params.n
    ratio = a / md if md else float("inf")
    chosen = " (chosen from the data; --alpha sets it)" if from_data else ""
    notes.append(f"alpha {a:g} is {ratio:.3g} x mean diag(H) = {md:.3g}{chosen}")
    if ratio >= _ALPHA_DOMINATES:
        notes.append(f"warning: alpha dominates H (>= {_ALPHA_DOMINATES:g} x its mean diagonal): saliencies tend to "
                     "magnitude order; lower --alpha")
    # sum over eigenvalues l of (1/P) sum X X^T of alpha / (l + alpha) = alpha tr(H^-1): the directions
    # whose curvature is below alpha
    flat = a * trace
    if flat >= max(1.0, _RANK_DEFICIT * n):
        vectors = net.P * net.rows_per_sample
        bound = f"; {net.P} samples x {net.rows_per_sample} give at most rank {vectors}" if vectors < n else ""
        notes.append(f"H is numerically rank-deficient: about {flat:.0f} of its {n} weight directions have curvature "
                     f"below alpha (effective rank n - alpha tr H^-1 = {n - flat:.0f}{bound}); there alpha alone "
                     "sets H^-1 and corrections move weights where the calibration outputs do not constrain them, "
                     "so the predicted error can be far below the measured one: more calibration samples help")


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
        if net.checkpoints is not None:
            points = net.checkpoints.points
            summary["seconds"]["checkpoints"] = net.checkpoints.seconds
            summary["checkpoints"] = points
            flagged = [p["zeros"] for p in points if p["underestimated"]]
            if flagged:
                report.notes.append(f"measured error above {_UNDERESTIMATE}x the predicted at {len(flagged)} of "
                                    f"{len(points)} checkpoints, from {flagged[0]} zeros on")
            if res.stop_reason == "measured":
                report.notes.append(f"stopped at the last checkpoint whose measured error increase was within "
                                    f"--max-error-increase ({limit:.4g}): {points[-1]['zeros']} zeros went past it")
        if net.mode == "fd":
            fd = net.differences
            sites = [s.name for s in params.segments if s.site is not None]
            summary["finite_differences"] = dict(reason=net.fd_reason, sites=sites, redone=fd.redone, kinks=fd.kinks)
            report.notes.append(
                f"finite differences along the weights ({net.fd_reason}) for all {len(sites)} sites: "
                f"{', '.join(sites)}; {fd.redone} (sample, weight) pairs redone with smaller steps near a kink, "
                f"{fd.kinks} on a kink (the mean of the one-sided slopes)")
        if method == "obs":
            summary.update(alpha=net.alpha, alpha_from_data=options.alpha is None,
                           alpha_over_mean_diag=net.alpha / net.mean_diag if net.mean_diag else None)
            measured, predicted = summary["measured_error_increase"], float(res.error_increase)
            if _underestimated(net, predicted, measured, _WARN):
                report.warnings.append(
                    f"the measured error increase {measured:.4g} is {measured / max(predicted, 1e-300):.3g}x the "
                    f"predicted {predicted:.4g}: the quadratic model does not hold this far; check the model with "
                    "onnx-obs evaluate, and prune less (--sparsity), bound the measured error (--max-error-increase) "
                    "or rebuild H on the way (--recompute-every)")
    report.full_network = summary
    sec = summary["seconds"]
    text = (f"full-network {method}: {summary['zeros']} of {params.n} weights zero ({summary['removed']} removed "
            f"now; stop: {res.stop_reason}), predicted error increase {res.error_increase:.4g}")
    if net is not None:
        text += f", measured {summary['measured_error_increase']:.4g} (E {net.E0:.4g} -> {summary['error_after']:.4g})"
    text += f"; {sec['gradients']:.2f} s gradients, {sec['inverse']:.2f} s inverse, {sec['surgery']:.2f} s surgery"
    report.notes.append(text)

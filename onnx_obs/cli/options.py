"""Options shared by several commands, and the parsers of their values."""

from __future__ import annotations

import typer

from onnx_obs import api
from onnx_obs.errors import OnnxObsError

IncludeOpt = typer.Option(None, "--include", help="Only sites whose tensor or node name matches this regex.")
ExcludeOpt = typer.Option(None, "--exclude", help="Skip sites whose tensor or node name matches this regex.")
OpTypesOpt = typer.Option(None, "--op-types", help="Comma-separated op types to prune, e.g. Conv,Gemm.")
NoBatchingOpt = typer.Option(False, "--no-batching", help="Feed the arrays whole instead of slicing axis 0 into batches, for inputs not batched on axis 0 (scalars, recurrent states): one onnxruntime run per .npz of a directory (by name), per KEY__0, KEY__1, ... group of an .npz, or per plain file. Shapes are checked on every axis; samples count runs.")


def _selection(include, exclude, op_types) -> api.Selection:
    ops = [o.strip() for o in op_types.split(",") if o.strip()] if op_types else None
    return api.Selection(include, exclude, ops)


def _pattern(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise OnnxObsError(f"--pattern must look like N:M (e.g. 2:4), got '{text}'") from None
    return n, m

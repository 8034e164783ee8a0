"""The Typer app, its consoles, and the wrapper that turns user errors into one line."""

from __future__ import annotations

import functools
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from onnx_obs.errors import OnnxObsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune ONNX models with Optimal Brain Surgeon: remove weights, correct the "
                       "rest, write a standard ONNX file.")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


def handled(fn):
    """Turn user errors into one line on stderr and exit code 2 (tracebacks only with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxObsError as e:
            if _state["debug"]:
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written")
            raise typer.Exit(130)
    return wrapper

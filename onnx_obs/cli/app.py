"""The Typer app, its consoles, and the wrapper that turns user errors into one line."""

from __future__ import annotations

import functools
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from onnx_obs import __version__
from onnx_obs.errors import OnnxObsError

STDOUT = "-"   # `--json -`, `--report -`: write to stdout


class Commands(TyperGroup):
    """The command group, with two conventions applied to the arguments before parsing:
    `--debug` is accepted anywhere (it belongs to the group, before the command), and `--json`
    takes a value only when the next word is `-` or ends in `.json` (else it means stdout)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_args(args))


def normalize_args(args: list[str]) -> list[str]:
    end = args.index("--") if "--" in args else len(args)
    head, tail = args[:end], args[end:]
    debug = ["--debug"] if "--debug" in head else []
    head = [a for a in head if a != "--debug"]
    fixed = []
    for i, a in enumerate(head):
        fixed.append(a)
        nxt = head[i + 1] if i + 1 < len(head) else None
        if a == "--json" and not (nxt == STDOUT or (nxt or "").lower().endswith(".json")):
            fixed.append(STDOUT)
    return debug + fixed + tail


app = typer.Typer(cls=Commands, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Prune ONNX models with Optimal Brain Surgeon: remove weights, correct the "
                       "rest, write a standard ONNX file.")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnx-obs {__version__}")
        raise typer.Exit()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also accepted after the command)."),
             version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")):
    _state["debug"] = debug


def verbosity(quiet: bool, verbose: bool) -> bool | str:
    """The `progress` argument of the API for -q / -v: off, on, or a line per step."""
    if quiet and verbose:
        raise OnnxObsError("-q/--quiet and -v/--verbose contradict each other: give one")
    return "verbose" if verbose else not quiet


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

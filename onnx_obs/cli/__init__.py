"""The `onnx-obs` command line (Typer): app.py holds the app and error handling, options.py the
shared options, commands.py the commands, show.py what they print."""

from onnx_obs.cli import commands  # noqa: F401  (registers the commands on the app)
from onnx_obs.cli.app import _state, app

__all__ = ["_state", "app", "main"]


def main() -> None:
    app()

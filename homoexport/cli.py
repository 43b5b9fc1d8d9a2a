"""The ``homoexport`` command line: a thin Typer layer over the library functions.

Each command parses options, calls one library function with typed arguments, and prints its result.
No work is done here that a Python user could not do by calling the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from homoexport import __version__

app = typer.Typer(
    name="homoexport",
    help="Compress BERT-class encoders with HomoDistil to a budget measured on this machine, export them to "
    "quantized ONNX, and validate accuracy and latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"homoexport {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """homoexport: HomoDistil -> ONNX int8 -> GLUE and latency reports."""


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error (no traceback) and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)

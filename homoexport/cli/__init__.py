"""The ``homoexport`` command line (Typer), a thin layer over the library."""

from homoexport.cli.app import app

__all__ = ["app"]

"""The ``crossrank`` command line (typer). The library never imports this package."""

from crossrank.cli.app import app, main

__all__ = ["app", "main"]

"""The ``crossrank`` command line (typer). The library never imports this package."""

from crossrank.cli import living as _living  # noqa: F401  (registers `crossrank add`, `remove`, `compact`)
from crossrank.cli import serve as _serve  # noqa: F401  (registers `crossrank serve`)
from crossrank.cli.app import app, main

__all__ = ["app", "main"]

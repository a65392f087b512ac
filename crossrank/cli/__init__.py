"""The ``crossrank`` command line (typer). The library never imports this package.

``app.py`` holds the typer app and what every command shares; each module beside it registers its
commands on import, in the order ``crossrank --help`` lists them.
"""

# isort: off
from crossrank.cli import build as _build  # noqa: F401  (build)
from crossrank.cli import inspect as _inspect  # noqa: F401  (info, verify)
from crossrank.cli import search as _search  # noqa: F401  (search)
from crossrank.cli import rerank as _rerank  # noqa: F401  (rerank)
from crossrank.cli import living as _living  # noqa: F401  (add, remove, compact)
from crossrank.cli import serve as _serve  # noqa: F401  (serve)
from crossrank.cli import evaluate as _evaluate  # noqa: F401  (demo, eval, dataset)
from crossrank.cli import train as _train  # noqa: F401  (train-encoder, train)

# isort: on
from crossrank.cli.app import app, main

__all__ = ["app", "main"]

"""The ``crossrank`` command line: parse, call the library, render.

Every command is a thin shell over the public API (:class:`crossrank.Index` and friends). A
:class:`~crossrank.errors.CrossrankError` becomes one red line on stderr and exit code 1;
``--verbose`` shows the traceback instead. Heavy modules load inside the commands, so
``crossrank --help`` is quick.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from crossrank.cli.render import err_console
from crossrank.errors import CrossrankError

__all__ = ["app", "main"]

app = typer.Typer(
    name="crossrank",
    help=(
        "Multimodal image retrieval: a FAISS first stage, reranked by query tokens attending "
        "to image patches."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"verbose": False}
F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("crossrank").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _friendly_errors(fn: F) -> F:
    """Turn a CrossrankError into one red line and exit code 1 (a traceback with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CrossrankError as e:
            if _state["verbose"]:
                raise
            # escape: a message may hold brackets, e.g. pip install 'crossrank[serve]'
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -- build ------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    from crossrank.allocator import keep_large_allocations

    keep_large_allocations()  # large rerank buffers are reused, not re-faulted per query
    app()

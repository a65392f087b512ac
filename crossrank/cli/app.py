"""The ``crossrank`` command line: parse, call the library, render.

Every command is a thin shell over the public API (:class:`crossrank.Index` and friends). A
:class:`~crossrank.errors.CrossrankError` becomes one red line on stderr and exit code 1;
``--verbose`` shows the traceback instead. A usage error (an unknown command or flag, a bad flag
value) is one red line too, with exit code 2; Ctrl-C exits with 130. Heavy modules load inside the
commands, so ``crossrank --help`` is quick.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperGroup

from crossrank.cli.render import err_console
from crossrank.device import Precision
from crossrank.errors import CrossrankError

__all__ = ["FusionOption", "PrecisionOption", "RerankerOption", "app", "main", "parse_ids"]

# Recent typer releases bundle their own click: take its UsageError from where BadParameter lives.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_error(error: Exception) -> NoReturn:
    """Print a usage error as one red line (not typer's boxed panel) and exit with code 2."""
    if type(error).__name__ == "NoArgsIsHelpError":  # `crossrank` alone: the help, as typer shows
        raise error
    message = " ".join(str(getattr(error, "format_message", error.__str__)()).split())
    message = message.removesuffix(".")  # "Missing option '--ids'; see ...", not "'.; see"
    ctx = getattr(error, "ctx", None)
    hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    err_console.print(
        f"[bold red]error:[/] {escape(message + hint)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(2)


class _OneLineUsageErrors(TyperGroup):
    """The root command: usage errors of the group and of every command become one line.

    Arguments are parsed in ``make_context`` (the group's own) and inside ``invoke`` (the
    command's); a ``typer.BadParameter`` raised by a command's body passes through ``invoke`` too.
    """

    def make_context(self, info_name: str | None, args: list[str], *a: Any, **kw: Any) -> Any:
        try:
            return super().make_context(info_name, args, *a, **kw)
        except _UsageError as e:
            _usage_error(e)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            _usage_error(e)


app = typer.Typer(
    name="crossrank",
    cls=_OneLineUsageErrors,
    help=(
        "Multimodal image retrieval: a FAISS first stage, reranked by query tokens attending "
        "to image patches."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: ``--reranker`` and ``--fusion``, one definition for every command that ranks.
RerankerOption = Annotated[
    str,
    typer.Option(
        "--reranker",
        help=(
            "auto (a trained reranker when there is one: the index's own reranker/, blip-itm on "
            "a BLIP index, the shipped one for the demo encoder; else none: the first stage "
            "alone, with a hint on how to train one; image queries get none), maxsim, blip-itm, "
            "none, or a trained reranker folder."
        ),
    ),
]
#: ``--precision``: what the reranker computes in (crossrank.device.Precision).
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        help=(
            "What the reranker computes in: auto (bf16 on a GPU, float32 on the CPU), float32, "
            "or bfloat16 (on the CPU too: faster where the CPU has native bf16, scores move "
            "slightly)."
        ),
    ),
]
FusionOption = Annotated[
    str,
    typer.Option(
        "--fusion",
        help=(
            "auto (the reranker's recommendation, else rerank), rerank, sum, or weighted:ALPHA "
            "(ALPHA*rerank + (1-ALPHA)*first stage)."
        ),
    ),
]

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


#: The exit code of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _friendly_errors(fn: F) -> F:
    """Turn a CrossrankError into one red line and exit code 1, and Ctrl-C into one line and exit
    code 130 (a traceback with --verbose)."""

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
        except KeyboardInterrupt:
            if _state["verbose"]:
                raise
            err_console.print("[bold yellow]interrupted:[/] stopped", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def parse_ids(text: str, *, allow_empty: bool = False) -> list[int]:
    """``--ids`` as given: ``"3, 17,42"`` -> ``[3, 17, 42]``.

    Raises:
        typer.BadParameter: an item is not an integer, an item is empty (``1,,2``: an id may be
            missing), or there are none and ``allow_empty`` is False.
    """
    if not text.strip():
        if allow_empty:
            return []
        raise typer.BadParameter(
            "--ids is empty; give ids separated by commas, e.g. 3,17,42", param_hint="--ids"
        )
    ids = []
    for item in (t.strip() for t in text.split(",")):
        try:
            ids.append(int(item))
        except ValueError:
            what = "an empty item" if not item else repr(item)
            raise typer.BadParameter(
                f"--ids must be integer ids separated by commas, e.g. 3,17,42; got {what} in "
                f"{text!r}",
                param_hint="--ids",
            ) from None
    return ids


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -- build ------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    from crossrank.allocator import keep_large_allocations

    keep_large_allocations()  # large rerank buffers are reused, not re-faulted per query
    app()

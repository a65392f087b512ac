"""``crossrank search``: query an index from the terminal, or a stream of queries from stdin."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from crossrank.cli.app import (
    FusionOption,
    PrecisionOption,
    RerankerOption,
    _friendly_errors,
    _print_json,
    app,
)
from crossrank.cli.build import Engine
from crossrank.cli.render import (
    Notes,
    console,
    describe_search,
    err_console,
    explain_table,
    print_table,
)
from crossrank.device import Device, Precision
from crossrank.errors import CrossrankError

if TYPE_CHECKING:
    from crossrank.api.index import Index
    from crossrank.hits import SearchResult


@app.command()
@_friendly_errors
def search(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    query: Annotated[
        str | None,
        typer.Argument(
            help=(
                "The text to search for (or use --image). Without QUERY and --image, queries are "
                "read from stdin, one per line, with the model loaded once."
            )
        ),
    ] = None,
    # Checked by the library (1 to 2**63 - 1; capped at the index size), one line on error.
    k: Annotated[int, typer.Option("-k", "--k", help="Hits to return.")] = 10,
    rerank_k: Annotated[int, typer.Option(help="First-stage candidates to rerank (>= k).")] = 100,
    reranker: RerankerOption = "auto",
    fusion: FusionOption = "auto",
    where: Annotated[
        str | None,
        typer.Option(help='DuckDB SQL filter over metadata columns, e.g. "width > 256".'),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Search by this image file instead of a text.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model to encode the query with; must be the index's.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    precision: PrecisionOption = Precision.AUTO,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed (default: the index's).")
    ] = None,
    engine: EngineOption = Engine.LOCAL,
    ray_address: RayAddressOption = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object (one per line for queries read from stdin)."
        ),
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html", help="Also write the hits as a self-contained HTML page of thumbnails."
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help=(
                "Show where each query word looked in each hit: the reranker's attention over "
                "the patch grid (MaxSim: each word's best patch). A table of peak patches; the "
                "full maps in --json ('explain' per hit), and a heat map per word in --html."
            ),
        ),
    ] = False,
) -> None:
    """Search an index by text, or by image with --image; without either, read queries from stdin.

    Every input (the index, --where, --image, -k) is checked before the model loads. The footer
    names the encoder, the reranker and the fusion that ranked the hits; notes (the demo
    encoder, a query cut at the text encoder's positions, how to train a reranker) go to stderr.
    """
    import warnings

    from crossrank.search.encode import QueryTruncatedWarning
    from crossrank.shards import open_index

    if query is not None and image is not None:
        raise typer.BadParameter("give either a QUERY text or --image PATH, not both")
    from_stdin = query is None and image is None
    if from_stdin and html is not None:
        raise typer.BadParameter("--html writes the page of one query: give a QUERY or --image")
    one = [query if image is None else image] if not from_stdin else []
    # Checked before any model loads: the index (opening it), -k, --image, --fusion, --where.
    check_engine(engine, ray_address)
    if engine == Engine.RAY:  # the actors start once: the model is checked at open, with them
        idx = open_for_search(
            index, device.value, model, nprobe, engine, ray_address, precision=precision.value
        )
        idx.check_search(one, k=k, rerank_k=rerank_k, where=where, fusion=fusion)
    else:
        opts = {"device": device.value, "nprobe": nprobe, "precision": precision.value}
        idx = open_index(index, **opts)
        idx.check_search(one, k=k, rerank_k=rerank_k, where=where, fusion=fusion)
        if model is not None:  # a model named on the command line is loaded (and checked) now
            idx.close()
            idx = open_index(index, model=model, **opts)
    notes = Notes()
    with warnings.catch_warnings():
        # A cut query's warning reaches the user as a note (result.notes), not as a traceback line.
        warnings.simplefilter("ignore", QueryTruncatedWarning)
        for q in one or _stdin_queries():
            result = idx.search(
                q,
                k=k,
                rerank_k=rerank_k,
                where=where,
                reranker=None if reranker == "none" else reranker,
                fusion=fusion,
                explain=explain,
            )
            if html is not None:
                _write_html(result, html)
            if as_json:
                if from_stdin:  # one object per line: a stream a reader can take line by line
                    sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                else:
                    _print_json(result.to_dict())
            else:
                _print_result(result)
            notes.show(None if result.encoder is None else result.encoder.to_dict(), result.notes)


#: ``--engine``: where the shards of a sharded index are searched.
EngineOption = Annotated[
    Engine,
    typer.Option(
        help=(
            "Where a sharded index's shards are searched: local threads, or one Ray actor per "
            "shard (needs crossrank[ray])."
        )
    ),
]
#: ``--ray-address``: the Ray cluster of ``--engine ray``.
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --engine ray: HOST:PORT of a running Ray cluster (default: a local one).",
    ),
]


def check_engine(engine: Engine, ray_address: str | None) -> None:
    """``--ray-address`` only with ``--engine ray``: a usage error otherwise."""
    if ray_address is not None and engine != Engine.RAY:
        raise typer.BadParameter(
            "--ray-address needs --engine ray; add it, or leave --ray-address out",
            param_hint="--ray-address",
        )


def open_for_search(
    index: Path,
    device: str,
    model: str | None,
    nprobe: int | None,
    engine: Engine,
    ray_address: str | None,
    *,
    precision: str = "auto",
) -> Index:
    """An index (sharded or not) on local threads, or a sharded one on Ray actors."""
    opts = {"device": device, "model": model, "nprobe": nprobe, "precision": precision}
    if engine == Engine.RAY:
        from crossrank.distributed import open_on_ray  # only with --engine ray

        return open_on_ray(index, ray_address=ray_address, **opts)
    from crossrank.shards import open_index

    return open_index(index, **opts)


def _stdin_queries() -> Iterator[str]:
    """Queries from stdin, one per line (blank lines skipped); a prompt on stderr at a terminal."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err_console.print("query> ", end="", highlight=False)
        line = sys.stdin.readline()
        if not line:
            return
        text = line.strip()
        if text:
            yield text


def _write_html(result: SearchResult, html: Path) -> None:
    from crossrank.html import write_page

    try:
        write_page(result, html)
    except OSError as e:
        raise CrossrankError(f"--html {html} cannot be written: {e.strerror or e}") from e
    err_console.print(f"[dim]wrote {escape(str(html))}[/]", highlight=False)


def _print_result(result: SearchResult) -> None:
    """The hits as a table, then the counts and what ranked them (user text printed literally)."""
    table = Table(title=Text(repr(result.query)), title_justify="left")
    for col, justify in (
        ("#", "right"),
        ("score", "right"),
        ("first stage", "right"),
        ("rerank", "right"),
        ("id", "right"),
        ("path", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for rank, hit in enumerate(result, start=1):
        table.add_row(
            str(rank),
            f"{hit.score:.4f}",
            f"{hit.first_stage_score:.4f}",
            "-" if hit.rerank_score is None else f"{hit.rerank_score:.4f}",
            str(hit.id),
            Text(hit.path),
        )
    print_table(table)
    where = explain_table(result)
    if where is not None:
        print_table(where)
    c = result.counts
    line = (
        f"{c.returned} of {c.requested} requested · {c.filtered_out} filtered out · "
        f"{c.candidates} candidates · {result.timings_ms['total']:.1f} ms"
    )
    console.print(line if c.returned == c.requested else f"[yellow]{line}[/]", highlight=False)
    encoder = None if result.encoder is None else result.encoder.to_dict()
    console.print(describe_search(encoder, result.reranker, result.fusion), highlight=False)

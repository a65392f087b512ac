"""``crossrank search``: query an index from the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.render import (
    console,
    err_console,
    print_table,
)
from crossrank.device import Device
from crossrank.errors import CrossrankError


@app.command()
@_friendly_errors
def search(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    query: Annotated[
        str | None, typer.Argument(help="The text to search for (or use --image).")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Hits to return.")] = 10,
    rerank_k: Annotated[int, typer.Option(help="First-stage candidates to rerank (>= k).")] = 100,
    reranker: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the index's own reranker/; blip-itm on a BLIP index; the shipped "
                "demo reranker "
                "on a demo-encoder index; else maxsim), maxsim, blip-itm, none, or a trained "
                "reranker "
                "folder."
            )
        ),
    ] = "auto",
    fusion: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the reranker's recommendation, else rerank), rerank, sum, or weighted:ALPHA "
                "(ALPHA*rerank + (1-ALPHA)*first stage)."
            )
        ),
    ] = "auto",
    where: Annotated[
        str | None,
        typer.Option(help='DuckDB SQL filter over metadata columns, e.g. "width > 256".'),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Search by this image instead of a text.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model to encode the query with; must be the index's.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed (default: the index's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html", help="Also write the hits as a self-contained HTML page of thumbnails."
        ),
    ] = None,
) -> None:
    """Search an index by text, or by image with --image."""
    from crossrank.api.index import Index

    if (query is None) == (image is None):
        raise typer.BadParameter(
            "give either a QUERY text or --image PATH, not both and not neither"
        )
    idx = Index.open(index, device=device.value, model=model, nprobe=nprobe)
    result = idx.search(
        query if image is None else image,
        k=k,
        rerank_k=rerank_k,
        where=where,
        reranker=None if reranker == "none" else reranker,
        fusion=fusion,
    )
    if html is not None:
        from crossrank.html import write_page

        try:
            write_page(result, html)
        except OSError as e:
            raise CrossrankError(f"--html {html} cannot be written: {e.strerror or e}") from e
        err_console.print(f"[dim]wrote {escape(str(html))}[/]", highlight=False)
    if as_json:
        _print_json(result.to_dict())
        return
    table = Table(title=f"{result.query!r}", title_justify="left")
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
            hit.path,
        )
    print_table(table)
    c = result.counts
    line = (
        f"{c.returned} of {c.requested} requested · {c.filtered_out} filtered out · "
        f"{c.candidates} candidates · {result.timings_ms['total']:.1f} ms"
    )
    console.print(line if c.returned == c.requested else f"[yellow]{line}[/]")


# -- info / verify ----------------------------------------------------------------------------

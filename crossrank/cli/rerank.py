"""``crossrank rerank``: rerank the candidates another system chose, from the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crossrank.cli.app import (
    FusionOption,
    PrecisionOption,
    RerankerOption,
    _friendly_errors,
    _print_json,
    app,
    parse_ids,
)
from crossrank.cli.render import Notes
from crossrank.cli.search import _print_result
from crossrank.device import Device, Precision


@app.command()
@_friendly_errors
def rerank(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    query: Annotated[str | None, typer.Argument(help="The text query (or use --image).")] = None,
    # Required: left out, it would rerank nothing and exit 0 (an empty --ids "" still does).
    ids: Annotated[
        str,
        typer.Option(
            help="The candidates to rerank: comma-separated ids, e.g. 3,17,42 (each once).",
        ),
    ] = ...,
    k: Annotated[
        int | None, typer.Option("-k", "--k", help="Hits to return (default: every candidate).")
    ] = None,
    reranker: RerankerOption = "auto",
    fusion: FusionOption = "auto",
    image: Annotated[
        Path | None, typer.Option(help="Rerank for this image file instead of a text.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    precision: PrecisionOption = Precision.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Rerank the candidates a search backend chose (--ids) for a text or --image query.

    The candidates' stored patches are scored by the reranker as a search scores its own
    candidates; the first-stage score is this index's own (query vector . stored vector). Ids the
    index does not hold are named in one line. See docs/backends.md.
    """
    from crossrank.shards import open_index

    if (query is None) == (image is None):
        raise typer.BadParameter("give either a QUERY text or --image PATH (one of them)")
    candidates = parse_ids(ids, allow_empty=True)  # no candidates: an empty result
    # an unsharded or a sharded index
    idx = open_index(index, device=device.value, precision=precision.value)
    try:
        result = idx.rerank(
            query if image is None else image,
            candidates,
            k=k,
            reranker=None if reranker == "none" else reranker,
            fusion=fusion,
        )
    finally:
        idx.close()
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_result(result)
    Notes().show(None if result.encoder is None else result.encoder.to_dict(), result.notes)

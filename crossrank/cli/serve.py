"""``crossrank serve DIR``: the HTTP API and result page over one index (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crossrank.cli.app import _friendly_errors, app
from crossrank.cli.render import err_console
from crossrank.device import Device
from crossrank.errors import DependencyError

__all__ = ["serve"]


@app.command()
@_friendly_errors
def serve(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    allow_where: Annotated[
        bool,
        typer.Option(
            "--allow-where",
            help="Accept raw SQL `where` filters (trusted clients only; sandboxed).",
        ),
    ] = False,
    reranker: Annotated[
        str,
        typer.Option(
            help=(
                "auto, maxsim, blip-itm, none, or a trained reranker folder: used for every search."
            )
        ),
    ] = "auto",
    fusion: Annotated[str, typer.Option(help="auto, rerank, sum, or weighted:ALPHA.")] = "auto",
    rerank_k: Annotated[
        int, typer.Option(min=1, help="Candidates reranked when a request does not say.")
    ] = 100,
    model: Annotated[
        str | None, typer.Option(help="Model to encode queries with; must be the index's.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed (default: the index's).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve an index over HTTP: POST /search, GET /images/{id}, GET /healthz, / (a page), /docs."""
    try:
        import uvicorn
    except ImportError as e:
        raise DependencyError(
            f"crossrank serve needs uvicorn and fastapi ({e}); pip install 'crossrank[serve]'"
        ) from e
    from crossrank.serve import create_app  # raises DependencyError without fastapi

    api = create_app(
        index,
        allow_where=allow_where,
        device=device.value,
        model=model,
        nprobe=nprobe,
        reranker=None if reranker == "none" else reranker,
        fusion=fusion,
        rerank_k=rerank_k,
    )
    idx = api.state.index
    err_console.print(
        f"serving [bold]{idx.path}[/] ({len(idx)} images, generation {idx.manifest.generation}) on "
        f"http://{host}:{port}/ · API docs at /docs"
        + (" · [yellow]raw where allowed[/]" if allow_where else ""),
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(api, host=host, port=port, log_level=log_level)

"""``crossrank serve DIR``: the HTTP API and result page over one index (FastAPI + uvicorn)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from crossrank.cli.app import FusionOption, PrecisionOption, RerankerOption, _friendly_errors, app
from crossrank.cli.build import Engine
from crossrank.cli.render import err_console
from crossrank.cli.search import EngineOption, RayAddressOption, check_engine, open_for_search
from crossrank.device import Device, Precision
from crossrank.errors import DependencyError

__all__ = ["serve"]


@app.command()
@_friendly_errors
def serve(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    allow_where: Annotated[
        bool,
        typer.Option(
            "--allow-where",
            help="Accept raw SQL `where` filters (trusted clients only; sandboxed).",
        ),
    ] = False,
    reranker: RerankerOption = "auto",
    fusion: FusionOption = "auto",
    rerank_k: Annotated[
        int, typer.Option(min=1, help="Candidates reranked when a request does not say.")
    ] = 100,
    model: Annotated[
        str | None, typer.Option(help="Model to encode queries with; must be the index's.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    precision: PrecisionOption = Precision.AUTO,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed (default: the index's).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    engine: EngineOption = Engine.LOCAL,
    ray_address: RayAddressOption = None,
) -> None:
    """Serve an index over HTTP: POST /search, GET /images/{id}, GET /healthz, / (a page), /docs.

    A sharded index is served from threads, or with --engine ray from one Ray actor per shard.
    """
    _check_host(host)  # before the index and the model load, and before anything is announced
    check_engine(engine, ray_address)
    try:
        import uvicorn
    except ImportError as e:
        raise DependencyError(
            f"crossrank serve needs uvicorn and fastapi ({e}); pip install 'crossrank[serve]'"
        ) from e
    from crossrank.serve import create_app  # raises DependencyError without fastapi

    if log_level.lower() not in uvicorn.config.LOG_LEVELS:
        raise typer.BadParameter(
            f"unknown log level {log_level!r}; choose one of "
            + ", ".join(uvicorn.config.LOG_LEVELS),
            param_hint="--log-level",
        )

    opened = (
        open_for_search(
            index, device.value, model, nprobe, engine, ray_address, precision=precision.value
        )
        if engine == Engine.RAY
        else index  # create_app opens the folder (sharded or not) itself
    )
    api = create_app(
        opened,
        allow_where=allow_where,
        device=device.value,
        model=model,
        nprobe=nprobe,
        reranker=None if reranker == "none" else reranker,
        fusion=fusion,
        rerank_k=rerank_k,
        precision=precision.value,
    )
    idx = api.state.index
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"  # IPv6: [::1]
    # escape: a path or host is printed as it is, never read as console markup
    err_console.print(
        f"serving [bold]{escape(str(idx.path))}[/] ({len(idx)} images, generation "
        f"{idx.manifest.generation}) on {escape(url)} · API docs at /docs"
        + (" · [yellow]raw where allowed[/]" if allow_where else ""),
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(api, host=host, port=port, log_level=log_level)


_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


def _check_host(host: str) -> None:
    """An IP address, or a name this machine resolves; else a usage error (exit 2).

    Raises:
        typer.BadParameter: ``host`` cannot be listened on.
    """
    hint = "give an IP address such as 127.0.0.1 or 0.0.0.0, or a host name this machine resolves"
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not host or _DOTTED_NUMBERS.fullmatch(host) or any(c.isspace() for c in host):
        # 999.1.1.1 is no address; looking it up as a name would only wait on DNS.
        raise typer.BadParameter(f"{host!r} is not a valid IP address; {hint}", param_hint="--host")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise typer.BadParameter(
            f"{host!r} cannot be resolved ({why}); {hint}", param_hint="--host"
        ) from None

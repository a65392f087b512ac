"""The FastAPI application: search, images, health and the result page over one opened index.

    POST /search            {query, k, rerank_k, filters} -> the JSON of `crossrank search --json`
    GET  /images/{id}       the indexed image file of an id (404: no such id; 410: the file at its
                            path is not the indexed one any more)
    GET  /thumbnails/{id}   a small JPEG of it (?size=256), what the result page shows
    GET  /healthz           {status, images, generation, model, encoder, columns}
    GET  /                  the result page with a query box (?q=...&k=...&filters=...)
    GET  /openapi.json      the schema (and /docs)

``HEAD`` works on ``/images`` and ``/thumbnails``. Files are checked against what the index recorded
before a byte is served (:mod:`crossrank.serve.files`). The page's links are relative, so it works
mounted under any prefix and never builds a URL from the request's ``Host`` header.

Untrusted clients filter with structured ``filters`` (checked against the metadata schema, run with
parameters); a raw SQL ``where`` is refused unless the app is created with ``allow_where=True``.
The index's DuckDB connection is sandboxed once its metadata is loaded (no external access, locked
configuration), so no filter can read or write a file either way.

Searches are plain functions, so the server runs them in its thread pool; one opened
:class:`~crossrank.Index` serves them all.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from crossrank.errors import CrossrankError, DependencyError, FilterError, InvalidArgumentError

try:
    from fastapi import FastAPI, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - exercised by the CLI test with fastapi hidden
    raise DependencyError(
        f"the crossrank server needs fastapi and uvicorn ({e}); pip install 'crossrank[serve]'"
    ) from e

from crossrank.serve.files import RECORDED_COLUMNS, NotServable, Recorded, media_type, read_indexed
from crossrank.serve.models import (
    ErrorResponse,
    Health,
    SearchRequest,
    SearchResponse,
    ValidationErrorResponse,
)

if TYPE_CHECKING:
    from crossrank.api.index import Index
    from crossrank.hits import SearchResult

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/bmp", "image/tiff", "image/webp")
_FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'",
    "Cache-Control": "private, max-age=300",
}
THUMBNAIL_PX = 256  # the longer side of a thumbnail unless ?size= says otherwise
_THUMBNAIL_RANGE = (16, 1024)
_THUMBNAILS_KEPT = 1024  # thumbnails cached in memory (a few kB each), by content and size
_INT64 = (-(2**63), 2**63 - 1)
_UNPARSABLE_BODY = (
    "There was an error parsing the body"  # fastapi.routing's HTTPException(400) detail
)
_PAGE_K = 12  # hits on the result page unless ?k= says otherwise
_WHERE_DISABLED = (
    "where (raw SQL) is disabled on this server; filter with structured filters "
    "{column: value | {op: value}} instead, or start the server with --allow-where "
    "for trusted clients"
)


def create_app(
    index: Index | str | os.PathLike[str],
    *,
    allow_where: bool = False,
    device: str = "auto",
    model: str | Path | None = None,
    nprobe: int | None = None,
    reranker: str | None = "auto",
    fusion: str = "auto",
    rerank_k: int = 100,
    title: str = "crossrank",
    refresh: bool = True,
    precision: str = "auto",
) -> FastAPI:
    """Build the HTTP app for one index; serve it with uvicorn or mount it in another app.

    Args:
        index: an opened :class:`~crossrank.Index`, or the directory of one (opened here, once).
        allow_where: accept a raw DuckDB SQL ``where`` in requests. Only for trusted clients:
            it is run as SQL (sandboxed: no file access, configuration locked).
        device: where queries are encoded and reranked when ``index`` is a directory.
        model: the query model when ``index`` is a directory (default: the index's own).
        nprobe: IVF lists probed when ``index`` is a directory (default: the index's own).
        reranker: the reranker of every search (see :meth:`Index.search`); clients cannot name
            one, since a reranker may be a folder on the server.
        fusion: how the two stages' scores combine (see :meth:`Index.search`).
        rerank_k: candidates reranked when a request does not say (at least its ``k``).
        title: the API's title in the OpenAPI schema.
        refresh: before each request, move to the newest committed generation (one small file
            read; see :meth:`Index.refresh`), so that ``crossrank add``/``remove``/``compact`` in
            another process show without a restart. A request runs on one generation throughout.
        precision: what the reranker computes in when ``index`` is a directory (see
            :meth:`Index.open`).

    Returns:
        A FastAPI application; the index is in ``app.state.index``.

    Raises:
        IndexNotFoundError: ``index`` is a directory without a committed index.
        ModelMismatchError: ``model`` is not the index's model.
        InvalidArgumentError: ``rerank_k`` is not positive, or ``reranker`` or ``fusion`` is
            not one (an unknown name, a folder that does not exist).

    Example:
        >>> from fastapi import FastAPI  # doctest: +SKIP
        >>> backend = FastAPI()  # doctest: +SKIP
        >>> backend.mount("/photos", create_app("photos.idx"))  # doctest: +SKIP
    """
    from crossrank.api.index import Index

    if not isinstance(rerank_k, int) or rerank_k < 1:
        raise InvalidArgumentError(
            f"rerank_k must be a positive number of candidates, got {rerank_k!r}"
        )
    if not isinstance(index, Index):
        from crossrank.shards import open_index  # an index folder, or a sharded one

        index = open_index(index, device=device, model=model, nprobe=nprobe, precision=precision)
    _ = index.encoder  # load it now: the first request should not pay for it, nor fail on it
    # The same for the reranker and the fusion: a bad one would fail every request.
    index.check_search(fusion=fusion)
    index._reranker(reranker)
    opened: Index = index

    app = FastAPI(
        title=title,
        version=_version(),
        description=(
            f"Search the {len(opened)} images of {opened.path.name} by text: a first stage over "
            "pooled vectors, reranked by query tokens attending to image patches."
        ),
    )
    app.state.index = opened
    app.state.allow_where = allow_where
    logger.info(
        "serving %s (%d images), raw where %s",
        opened.path,
        len(opened),
        "allowed" if allow_where else "refused",
    )

    def fresh() -> None:
        """Move to the newest committed generation; keep serving the old one if that fails."""
        if not refresh:
            return
        try:
            opened.refresh()
        except CrossrankError as e:
            logger.warning(
                "index %s: cannot move to the newest generation (%s); serving generation %d",
                opened.path,
                e,
                opened.manifest.generation,
            )

    def run_search(
        query: str,
        k: int,
        asked_rerank_k: int | None,
        filters: dict[str, Any] | None,
        where: str | None,
        explain: bool = False,
    ) -> SearchResult:
        n_candidates = max(k, rerank_k) if asked_rerank_k is None else asked_rerank_k
        return opened.search(
            query,
            k=k,
            rerank_k=n_candidates,
            where=where,
            reranker=reranker,
            fusion=fusion,
            filters=filters or None,
            explain=explain,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_error_item(e) for e in exc.errors()]
        if request.scope.get("endpoint") is page:  # a person at the result page: show it there
            q, filters = (request.query_params.get(name, "")[:20_000] for name in ("q", "filters"))
            return render(q, _PAGE_K, filters, [], _one_line(errors))
        return JSONResponse(
            status_code=422, content={"detail": _one_line(errors), "errors": errors}
        )

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            # FastAPI's answer to a body it cannot even decode (not UTF-8): malformed JSON too.
            cause = exc.__cause__
            why = (
                "it is not UTF-8"
                if isinstance(cause, UnicodeDecodeError)
                else f"it cannot be parsed ({type(cause).__name__})"
                if cause
                else "it cannot be parsed"
            )
            msg = f"the body is not valid JSON: {why}"
            return JSONResponse(
                status_code=422,
                content={
                    "detail": msg,
                    "errors": [{"loc": ["body"], "msg": msg, "type": "json_invalid"}],
                },
            )
        return await http_exception_handler(request, exc)

    @app.post(
        "/search",
        response_model=SearchResponse,
        # hits[].explain only when asked: the answer is then exactly the library's JSON.
        response_model_exclude_unset=True,
        summary="Search the index by text",
        responses={
            403: {
                "model": ErrorResponse,
                "description": "a raw `where` on a server that refuses it",
            },
            422: {
                "model": ValidationErrorResponse,
                "description": "malformed JSON, a bad field, or a filter the metadata cannot take",
            },
        },
    )
    def search(request: SearchRequest) -> Any:
        """The ``k`` images that best match ``query``, best first, with the counts of how the
        list came to be (requested, returned, filtered out, candidates) and per-stage timings."""
        if request.where is not None and not allow_where:
            return JSONResponse(status_code=403, content={"detail": _WHERE_DISABLED})
        fresh()
        try:
            result = run_search(
                request.query,
                request.k,
                request.rerank_k,
                request.filters,
                request.where,
                request.explain,
            )
        except (FilterError, InvalidArgumentError) as e:
            return _refused(e)
        return result.to_dict()

    thumbnails: OrderedDict[tuple[str, int], bytes] = OrderedDict()
    thumbnails_lock = threading.Lock()

    def indexed_file(image_id: int) -> tuple[Recorded, bytes] | JSONResponse:
        """The checked bytes of an id's file, or the 404/410 that says why there are none."""
        # Through Index.metadata, which knows which ids a search can return (removed ones not).
        fresh()
        columns = [c for c in RECORDED_COLUMNS if c in opened.metadata_store.columns]
        rows = opened.metadata(columns=columns, filters={"id": image_id}).to_pylist()
        if not rows:
            return JSONResponse(
                status_code=404, content={"detail": f"no image with id {image_id} in this index"}
            )
        recorded = Recorded.from_row(rows[0])
        try:
            return recorded, read_indexed(recorded)
        except NotServable as why:
            return _gone(image_id, why)

    file_responses: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorResponse, "description": "no such id in the index"},
        410: {
            "model": ErrorResponse,
            "description": "the file at the id's path is gone or is not the indexed file any more",
        },
        422: {"model": ValidationErrorResponse, "description": "a parameter is not valid"},
    }

    @app.get(
        "/images/{image_id}",
        name="image",
        summary="The image file of an id in the index",
        response_class=Response,
        responses={
            200: {
                "content": {t: {} for t in _IMAGE_TYPES} | {"application/octet-stream": {}},
                "description": "the image file, byte for byte as indexed",
            },
            **file_responses,
        },
    )
    def image(image_id: Annotated[int, PathParam(ge=_INT64[0], le=_INT64[1])]) -> Any:
        """Serve the file an id of the index was built from, only while it is the indexed file."""
        found = indexed_file(image_id)
        if isinstance(found, JSONResponse):
            return found
        recorded, data = found
        try:
            kind = media_type(data)
        except NotServable as why:
            return _gone(image_id, why)
        headers = dict(_FILE_HEADERS)
        if recorded.sha256:
            headers["ETag"] = f'"{recorded.sha256}"'
        return Response(data, media_type=kind, headers=headers)

    @app.get(
        "/thumbnails/{image_id}",
        name="thumbnail",
        summary="A small JPEG of the image of an id in the index",
        response_class=Response,
        responses={
            200: {
                "content": {"image/jpeg": {}},
                "description": "a JPEG whose longer side is at most `size` px",
            },
            **file_responses,
        },
    )
    def thumbnail(
        image_id: Annotated[int, PathParam(ge=_INT64[0], le=_INT64[1])],
        size: Annotated[
            int,
            Query(
                ge=_THUMBNAIL_RANGE[0],
                le=_THUMBNAIL_RANGE[1],
                description="The longer side in px (smaller images keep their size).",
            ),
        ] = THUMBNAIL_PX,
    ) -> Any:
        """A JPEG thumbnail of an id's image (made from the checked file; any format, TIFF too)."""
        from crossrank.errors import DecodeError
        from crossrank.html import jpeg_thumbnail

        found = indexed_file(image_id)
        if isinstance(found, JSONResponse):
            return found
        recorded, data = found
        key = (recorded.sha256, size) if recorded.sha256 else None
        with thumbnails_lock:
            jpeg = thumbnails.get(key) if key else None
            if key and jpeg is not None:
                thumbnails.move_to_end(key)
        if jpeg is None:
            try:
                jpeg = jpeg_thumbnail(data, size)
            except DecodeError as e:
                return _gone(image_id, NotServable(f"cannot be decoded any more ({e})"))
            if key:
                with thumbnails_lock:
                    thumbnails[key] = jpeg
                    while len(thumbnails) > _THUMBNAILS_KEPT:
                        thumbnails.popitem(last=False)
        headers = dict(_FILE_HEADERS)
        if recorded.sha256:
            headers["ETag"] = f'"{recorded.sha256}-{size}"'
        return Response(jpeg, media_type="image/jpeg", headers=headers)

    # HEAD: the same answers without the body (FastAPI routes GET alone); kept out of the schema
    # so that each operation appears once.
    for path, endpoint in (("/images/{image_id}", image), ("/thumbnails/{image_id}", thumbnail)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/healthz", response_model=Health, summary="Liveness, and what the index holds")
    def healthz() -> Any:
        """The index is open: its image count, generation, model (``encoder``: what it is, with a
        one-line note for the demo encoder) and filterable metadata columns."""
        fresh()
        schema = opened.metadata_store.schema
        return {
            "status": "ok",
            "images": len(opened),
            "generation": int(opened.manifest.generation),
            "model": opened.model_id,
            "encoder": _describe(opened).to_dict(),
            "columns": {f.name: str(f.type) for f in schema},
        }

    @app.get(
        "/",
        response_class=HTMLResponse,
        summary="The result page, with a query box",
        responses={
            422: {
                "description": "the page with a bad parameter or filter named above the query box"
            }
        },
    )
    def page(
        q: Annotated[
            str | None, Query(max_length=1000, description="The text to search for.")
        ] = None,
        k: Annotated[int, Query(ge=1, le=100, description="Hits to show.")] = _PAGE_K,
        filters: Annotated[
            str | None,
            Query(max_length=20_000, description="Structured filters as JSON (see POST /search)."),
        ] = None,
    ) -> HTMLResponse:
        """A grid of thumbnails with first-stage and reranked scores and the metadata on hover;
        ``?q=`` searches (server-side, no script)."""
        results: list[SearchResult] = []
        error: str | None = None
        fresh()
        if q is not None and q.strip():
            try:
                parsed = _parse_filters_param(filters)
                # The page shows where each word looked (word chips over the thumbnails).
                results = [run_search(q, k, None, parsed, None, explain=True)]
            except (FilterError, InvalidArgumentError) as e:
                error = str(e)
        return render(q, k, filters, results, error)

    def render(
        q: str | None,
        k: int,
        filters: str | None,
        results: list[SearchResult],
        error: str | None,
    ) -> HTMLResponse:
        from crossrank.html import SearchForm, render_page

        # Relative URLs: the page is the app's root, so they resolve under whatever prefix the
        # app is mounted at, and nothing is built from the request's Host header.
        form = SearchForm(action="./", query=q or "", k=k, filters=filters or "")
        html = render_page(
            results,
            image_src=lambda hit: f"thumbnails/{int(hit.id)}?size={THUMBNAIL_PX}",
            image_href=lambda hit: f"images/{int(hit.id)}",
            form=form,
            error=error,
            title=f"{title}: {q}" if q else title,
            message=f"Search {len(opened)} images: type a query.",
            encoder=_describe(opened),
        )
        return HTMLResponse(html, status_code=422 if error else 200)

    return app


def _describe(index: Index) -> Any:
    """The index's encoder in the words every output uses (a ModelDescription)."""
    from crossrank.encoders.describe import describe_model

    return describe_model(index.manifest.encoder)


def _gone(image_id: int, why: NotServable) -> JSONResponse:
    return JSONResponse(
        status_code=410,
        content={
            "detail": (
                f"the file of image {image_id} {why}; it is no longer served: rebuild the index "
                "or `crossrank add` its folder"
            )
        },
    )


def _parse_filters_param(text: str | None) -> dict[str, Any] | None:
    """The page's ``filters`` parameter: JSON text of a structured filter (blank: none)."""
    from crossrank.store.filters import check_filter_shape

    if text is None or not text.strip():
        return None
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as e:
        raise FilterError(
            f'filters are not valid JSON ({e}); e.g. {{"width": {{"ge": 256}}}}'
        ) from None
    check_filter_shape(filters)
    return filters


def _refused(error: CrossrankError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(error), "errors": []})


def _error_item(error: dict[str, Any]) -> dict[str, Any]:
    """A pydantic error as JSON: location, message (a validator's own words), type."""
    loc = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
    kind = str(error.get("type", "value_error"))
    msg = str(error.get("msg", ""))
    ctx = error.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        msg = str(ctx["error"])  # the validator's message, without pydantic's "Value error, "
    elif kind == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        msg = f"the body is not valid JSON{where}: {ctx.get('error', msg)}"
        loc = loc[:1]
    return {"loc": loc, "msg": " ".join(msg.split()), "type": kind}


def _one_line(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "the request cannot be used"
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"][1:]) if len(first["loc"]) > 1 else ""
    if first["loc"][:1] == ["body"] and not loc and first["type"] == "missing":
        text = 'the request has no JSON body; send {"query": "..."}'
    elif first["type"] == "value_error" or not loc:  # a validator's message names its subject
        text = first["msg"]
    else:
        text = f"{loc}: {first['msg']}"
    more = len(errors) - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _version() -> str:
    from crossrank import __version__

    return __version__

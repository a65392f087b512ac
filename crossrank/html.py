"""A result page: search hits as a grid of thumbnails with their scores, in one HTML file.

:func:`render_page` writes the page that ``crossrank search ... --html out.html`` saves and that the
server's ``GET /`` shows. Each hit is a thumbnail with its rank, id, file name, final score,
first-stage and reranked scores; hovering it shows its path and metadata (a tooltip, and an overlay
drawn by CSS alone).

When the hits carry explanations (``search(..., explain=True)``), a row of word chips sits above
the grid: choosing a word (a click, or the keyboard: the chips are radio buttons) or hovering it
lays that word's heat map over every thumbnail, showing where it looked. Each map is a tiny PNG
(``data:`` URI) of the patch grid, drawn over the whole image and scaled smoothly by the browser;
it is stretched to the image's aspect ratio, so for an encoder that centre-crops (CLIP) a
non-square image's map spans the full picture rather than the central square the encoder saw.
The chips work with CSS alone (``:checked`` and ``:hover`` sibling selectors): the page still
runs no script.

The page names the encoder (with the one-line note when it is the demo encoder) and, for each
query, the reranker and fusion that ranked its hits.

A saved page is self-contained: thumbnails are small JPEGs inlined as ``data:`` URIs (made with
Pillow through the same robust decoder as indexing), the style is inline, there is no script, and a
Content-Security-Policy forbids loading anything else. The server's page loads the same JPEG
thumbnails from its own ``thumbnails/{id}`` route (:func:`jpeg_thumbnail`). Every text from the
index or the query is HTML-escaped, so a file name or metadata value such as ``<script>`` stays
text.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossrank.hits import Hit, SearchResult

__all__ = [
    "SearchForm",
    "render_page",
    "write_page",
    "thumbnail_data_uri",
    "jpeg_thumbnail",
    "THUMBNAIL_SIZE",
]

THUMBNAIL_SIZE = (
    192  # px: the longer side of an inlined thumbnail (shown at up to 160 px, sharp on HiDPI)
)
_FRAME_PX = 160  # px: the height of a hit's image frame (.frame in the style)


@dataclass(frozen=True)
class SearchForm:
    """The query box drawn above the results (the server's page); ``None`` on a saved page.

    Attributes:
        action: the URL the form submits to with GET (``q``, ``k``, ``filters``).
        query: the text shown in the query box.
        k: the number of hits asked for.
        filters: the structured filters as JSON text, shown in the filters box.
    """

    action: str
    query: str = ""
    k: int = 12
    filters: str = ""


def thumbnail_data_uri(path: str | os.PathLike[str], size: int = THUMBNAIL_SIZE) -> str | None:
    """A small JPEG thumbnail of an image file as a ``data:`` URI.

    Args:
        path: the image file.
        size: the longer side of the thumbnail in px; smaller images keep their size.

    Returns:
        ``"data:image/jpeg;base64,..."``, or None when the file is gone or cannot be decoded.
    """
    from crossrank.errors import DecodeError
    from crossrank.ingest import decode_image

    try:
        image, _ = decode_image(Path(path))
    except (DecodeError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(_to_jpeg(image, size)).decode("ascii")


def jpeg_thumbnail(data: bytes, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG thumbnail of an image file's bytes, decoded the way indexing decodes.

    Only the first frame is decoded; a header announcing more than the indexing limit of pixels
    is refused before any pixel is decoded; EXIF orientation is applied; transparency is
    composited on white (:func:`crossrank.ingest.to_rgb`).

    Args:
        data: the bytes of an image file (any format Pillow reads: a TIFF becomes a JPEG).
        size: the longer side of the thumbnail in px; smaller images keep their size.

    Returns:
        The JPEG's bytes.

    Raises:
        DecodeError: ``data`` is not an image Pillow can decode, or is too large.
    """
    from PIL import Image, ImageOps

    from crossrank.errors import DecodeError
    from crossrank.ingest import DEFAULT_MAX_PIXELS, to_rgb

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise DecodeError(f"{width}x{height} pixels is over the limit of {DEFAULT_MAX_PIXELS}")
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
    except DecodeError:
        raise
    except Exception as e:  # Pillow raises many types for bad data; each means "cannot decode"
        raise DecodeError(f"cannot decode the image ({type(e).__name__}: {e})") from e
    return _to_jpeg(image, size)


def _to_jpeg(image: Any, size: int) -> bytes:
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


def render_page(
    results: SearchResult | Sequence[SearchResult],
    *,
    image_src: Callable[[Hit], str | None] | None = None,
    title: str | None = None,
    form: SearchForm | None = None,
    error: str | None = None,
    message: str | None = None,
    encoder: Any = None,
    image_href: Callable[[Hit], str | None] | None = None,
) -> str:
    """Render search results as one HTML page.

    Args:
        results: one :class:`SearchResult` or several (one section each, in order).
        image_src: the ``src`` of each hit's image; default :func:`thumbnail_data_uri` of its
            file, which makes the page self-contained. A None src shows "image unavailable".
        title: the page title; default ``crossrank: <first query>``.
        form: draw a query box that submits to ``form.action`` (the server's page).
        error: a one-line error to show above the results (e.g. a bad filter).
        message: a one-line note to show when there are no results (e.g. "type a query").
        encoder: the encoder to name at the top: a
            :class:`~crossrank.encoders.describe.ModelDescription` (its ``model_id``,
            ``model_type`` and, for the demo encoder, its one-line ``note``); default the
            ``encoder`` of the first result that has one.
        image_href: where a click on a hit's image leads (the server: the full image); default
            nowhere.

    Returns:
        The page, a complete HTML document.

    Example:
        >>> page = render_page(index.search("a red bicycle", k=12))  # doctest: +SKIP
        >>> Path("out.html").write_text(page, encoding="utf-8")  # doctest: +SKIP
    """
    if isinstance(results, SearchResult):
        results = [results]
    inline = image_src is None
    src = image_src or (lambda hit: thumbnail_data_uri(hit.path))
    if title is None:
        title = f"crossrank: {results[0].query}" if results else "crossrank"
    # A saved page may show inlined images only; the server's page also its own /images/ URLs.
    img_src = "data:" if inline else "'self' data:"
    csp = f"default-src 'none'; img-src {img_src}; style-src 'unsafe-inline'; form-action 'self'"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="crossrank">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}{_word_rules(results)}</style>",
        "</head><body>",
    ]
    if form is not None:
        parts.append(_form(form))
    if error:
        parts.append(f'<p class="error" role="alert">{_e(error)}</p>')
    if encoder is None:
        encoder = next(
            (getattr(r, "encoder", None) for r in results if getattr(r, "encoder", None)), None
        )
    if encoder is not None:
        parts.append(_encoder(encoder))
    if not results and message:
        parts.append(f'<p class="note">{_e(message)}</p>')
    for number, result in enumerate(results):
        parts.append(_section(result, src, image_href, number))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(
    results: SearchResult | Sequence[SearchResult], path: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Write :func:`render_page` of ``results`` to ``path`` (UTF-8); returns the path.

    Raises:
        OSError: the file cannot be written.
    """
    out = Path(path)
    out.write_text(render_page(results, **kwargs), encoding="utf-8")
    return out


# -- pieces -----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _side(value: Any) -> int:
    """A width or height from the metadata; unknown counts as large."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 1 << 30


def _score(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _form(form: SearchForm) -> str:
    return (
        f'<form class="query" method="get" action="{_e(form.action)}">'
        f'<input type="search" name="q" value="{_e(form.query)}" '
        'placeholder="a red circle left of a blue square" '
        'aria-label="query" autofocus required maxlength="1000">'
        f'<input type="text" name="filters" value="{_e(form.filters)}" '
        'placeholder=\'filters, e.g. {"width": {"ge": 256}}\' aria-label="filters (JSON)">'
        f'<label>k <input type="number" name="k" value="{int(form.k)}" min="1" max="100"></label>'
        '<button type="submit">search</button></form>'
    )


def _encoder(encoder: Any) -> str:
    """The encoder's line, and the demo encoder's one-line note under it."""
    kind = getattr(encoder, "model_type", "")
    line = f"encoder: {getattr(encoder, 'model_id', encoder)}" + (f" ({kind})" if kind else "")
    note = getattr(encoder, "note", None)
    shown = f'<p class="warn" role="note">{_e(note)}</p>' if note else ""
    return f'<p class="model">{_e(line)}</p>{shown}'


def _section(
    result: SearchResult,
    src: Callable[[Hit], str | None],
    href: Callable[[Hit], str | None] | None,
    number: int = 0,
) -> str:
    c = result.counts
    total = result.timings_ms.get("total")
    line = (
        f"{c.returned} of {c.requested} requested · {c.filtered_out} filtered out · "
        f"{c.candidates} candidates" + (f" · {total:.1f} ms" if total is not None else "")
    )
    reranker, fusion = getattr(result, "reranker", None), getattr(result, "fusion", None)
    ranked = f"reranker {reranker} · fusion {fusion}" if reranker or fusion else ""
    notes = "".join(
        f'<p class="warn" role="note">{_e(note)}</p>' for note in getattr(result, "notes", ())
    )
    items = [
        _hit(rank, hit, src(hit), href(hit) if href else None)
        for rank, hit in enumerate(result, start=1)
    ]
    empty = '<p class="note">no image matches</p>' if not items else ""
    return (
        f'<section class="result"><h1>{_e(result.query)}</h1>'
        f'<p class="counts">{_e(line)}</p>'
        + (f'<p class="ranking">{_e(ranked)}</p>' if ranked else "")
        + f'{notes}{empty}{_word_chips(result, number)}<ol class="grid">{"".join(items)}</ol>'
        "</section>"
    )


def _tokens(result: SearchResult) -> tuple[str, ...]:
    """The words of the first explained hit (every hit of a result has the same ones)."""
    return next((hit.explain.tokens for hit in result if hit.explain is not None), ())


def _word_chips(result: SearchResult, number: int) -> str:
    """Radio buttons and their labels, one per query word, siblings of the grid: the CSS of
    :func:`_word_rules` shows word i's maps when chip i is checked or hovered."""
    tokens = _tokens(result)
    if not tokens:
        return ""
    group = f"words-{number}"
    chips = [
        f'<input type="radio" name="{group}" id="{group}-off" class="word" checked>'
        f'<label for="{group}-off" class="chip">no map</label>'
    ]
    for i, token in enumerate(tokens):
        chips.append(
            f'<input type="radio" name="{group}" id="{group}-{i}" class="word w{i}">'
            f'<label for="{group}-{i}" class="chip w{i}">{_e(token)}</label>'
        )
    return '<p class="words">where each word looked:</p>' + "".join(chips)


def _word_rules(results: Sequence[SearchResult]) -> str:
    """CSS showing word i's heat maps while its chip is checked or hovered (no script)."""
    n = max((len(_tokens(r)) for r in results), default=0)
    return "".join(
        f"input.w{i}:checked~ol .heat.w{i},label.w{i}:hover~ol .heat.w{i}{{display:block}}"
        for i in range(n)
    )


def _heat_uri(weights: Any, grid: tuple[int, int], width: Any, height: Any) -> str:
    """One word's map as a small PNG ``data:`` URI: a dark veil, clear where the word looked
    (a spotlight reads on images of any colour, where a coloured heat would vanish on its own
    colour).

    Weights are scaled by the map's own maximum (so a spread-out word is as visible as a
    focused one). The PNG is the patch grid, enlarged by whole cells to the image's aspect
    ratio when the metadata gives it, so that ``object-fit: contain`` lays it over the image.
    """
    import numpy as np
    from PIL import Image

    rows, cols = grid
    w = np.asarray(weights, dtype=np.float32).reshape(rows, cols)
    peak = float(w.max())
    share = np.clip(w / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(w)
    rgba = np.zeros((rows, cols, 4), dtype=np.uint8)  # black
    rgba[..., 3] = ((1.0 - share**0.5) * 190).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if _side(width) < 1 << 30 and _side(height) < 1 << 30 and width != height:
        scale = 48 / max(width, height)
        size = (max(cols, round(width * scale)), max(rows, round(height * scale)))
        image = image.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat_maps(hit: Hit) -> str:
    """The hit's heat-map overlays, one per word, hidden until the word is chosen."""
    ex = hit.explain
    if ex is None:
        return ""
    width, height = hit.metadata.get("width"), hit.metadata.get("height")
    return "".join(
        f'<img class="heat w{i}" alt="where {_e(token)} looked" '
        f'src="{_heat_uri(ex.maps[i], ex.grid, width, height)}">'
        for i, token in enumerate(ex.tokens)
    )


def _hit(rank: int, hit: Hit, src: str | None, href: str | None = None) -> str:
    meta = {"id": hit.id, "path": hit.path, **hit.to_dict()["metadata"]}
    tooltip = "\n".join(f"{k}: {v}" for k, v in meta.items())
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta.items())
    name = os.path.basename(hit.path) or hit.path
    if src is None:
        picture = '<div class="missing">image unavailable</div>'
    else:
        # Images smaller than the frame are scaled up: keep their pixels sharp.
        small = max(_side(hit.metadata.get("width")), _side(hit.metadata.get("height"))) < _FRAME_PX
        cls = ' class="pixel"' if small else ""
        picture = f'<img src="{_e(src)}" alt="{_e(name)}"{cls} decoding="sync">'
        if href is not None:
            picture = f'<a href="{_e(href)}">{picture}</a>'
        picture += _heat_maps(hit)
    return (
        f'<li class="hit" title="{_e(tooltip)}" data-id="{hit.id}">'
        f'<div class="frame">{picture}<dl class="meta">{rows}</dl></div>'
        f'<div class="caption"><span class="rank">#{rank}</span> '
        f'<span class="name">{_e(name)}</span></div>'
        f'<div class="scores"><span title="final score">score {_score(hit.score)}</span>'
        f'<span title="first stage (pooled vectors)">first {_score(hit.first_stage_score)}</span>'
        f'<span title="reranker">rerank {_score(hit.rerank_score)}</span></div>'
        "</li>"
    )


_STYLE = """
:root{color-scheme:light dark;--fg:#1d1f23;--muted:#646a73;--card:#f4f5f7;--line:#d9dce1;
--accent:#2f6fde}
@media (prefers-color-scheme:dark){:root{--fg:#e6e8eb;--muted:#9aa1ab;--card:#22252a;
--line:#3a3f46}}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);margin:24px;}
h1{font-size:18px;margin:20px 0 2px}
.counts,.note{color:var(--muted);margin:0 0 12px}
.model,.ranking{color:var(--muted);margin:0 0 4px}
.warn{background:#fff4d6;color:#5c4400;padding:6px 10px;border-radius:6px;margin:0 0 12px}
.error{color:#fff;background:#c62828;padding:8px 12px;border-radius:6px}
form.query{display:flex;gap:8px;flex-wrap:wrap;align-items:center}
form.query input[type=search]{flex:2 1 320px;font-size:16px;padding:6px 10px}
form.query input[type=text]{flex:1 1 220px;font:13px ui-monospace,monospace;padding:7px 10px}
form.query input[type=number]{width:4.5em;padding:6px}
form.query button{padding:7px 16px;background:var(--accent);color:#fff;border:0;border-radius:6px}
ol.grid{list-style:none;padding:0;margin:0;display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(176px,1fr))}
li.hit{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px;
min-width:0}
.frame{position:relative;height:160px}
.frame a{display:block}
.frame img{display:block;width:100%;height:160px;object-fit:contain}
.frame img.pixel{image-rendering:pixelated}
.frame .missing{line-height:160px;text-align:center}
.missing{color:var(--muted);font-style:italic}
dl.meta{display:none;position:absolute;inset:0;margin:0;padding:6px 8px;overflow:auto;
font:11px/1.35 ui-monospace,monospace;background:rgba(15,17,20,.88);color:#f1f3f5;border-radius:4px}
li.hit:hover dl.meta{display:grid;grid-template-columns:auto 1fr;column-gap:6px;align-content:start}
dl.meta dt{color:#9ec1ff}dl.meta dd{margin:0;overflow-wrap:anywhere}
.caption{margin-top:6px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.rank{font-weight:600}
.scores{display:flex;flex-wrap:wrap;gap:2px 8px;font:12px ui-monospace,monospace;color:var(--muted)}
.scores span:first-child{color:var(--fg);font-weight:600}
.words{color:var(--muted);margin:0 0 4px}
input.word{position:absolute;opacity:0;width:1px;height:1px;margin:0}
label.chip{display:inline-block;margin:0 6px 10px 0;padding:3px 10px;border:1px solid var(--line);
border-radius:12px;cursor:pointer;background:var(--card)}
label.chip:hover,input.word:focus-visible+label.chip{border-color:var(--accent)}
input.word:checked+label.chip{background:var(--accent);border-color:var(--accent);color:#fff}
.frame img.heat{display:none;position:absolute;inset:0;width:100%;height:160px;object-fit:contain;
pointer-events:none}
"""

"""The result page: a self-contained grid of thumbnails with both stages' scores and metadata."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from crossrank.cli import app as cli
from crossrank.hits import Hit, SearchCounts, SearchResult
from crossrank.html import (
    THUMBNAIL_SIZE,
    SearchForm,
    jpeg_thumbnail,
    render_page,
    thumbnail_data_uri,
    write_page,
)

from ._browser import HAVE_CHROMIUM, PROBE, chromium_args, probe, static_server

QUERY = "a red circle left of a blue square"


class _Tags(HTMLParser):
    """Every start tag with its attributes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _result(hits: list[Hit], query: str = QUERY) -> SearchResult:
    counts = SearchCounts(
        requested=len(hits), returned=len(hits), filtered_out=0, candidates=len(hits)
    )
    return SearchResult(query=query, hits=tuple(hits), counts=counts, timings_ms={"total": 1.25})


@pytest.fixture(scope="module")
def result(built_index: Path) -> SearchResult:
    from crossrank import Index

    # MaxSim by name: the page shows both stages' scores (auto may rank by the first stage alone).
    return Index.open(built_index, device="cpu").search(QUERY, k=6, rerank_k=12, reranker="maxsim")


def test_page_shows_each_hit_as_an_inlined_thumbnail_with_both_scores(result: SearchResult) -> None:
    page = render_page(result)
    images = [attrs for tag, attrs in _tags(page) if tag == "img"]
    assert len(images) == 6
    for attrs, hit in zip(images, result, strict=True):
        src = attrs["src"]
        assert src is not None and src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        original = Image.open(hit.path)
        assert thumb.size == original.size  # smaller than THUMBNAIL_SIZE: kept as is
        assert attrs["alt"] == Path(hit.path).name
    for rank, hit in enumerate(result, start=1):
        assert f'<span class="rank">#{rank}</span>' in page
        assert f"first {hit.first_stage_score:.4f}" in page
        assert f"rerank {hit.rerank_score:.4f}" in page
        assert f"score {hit.score:.4f}" in page
    assert "6 of 6 requested · 0 filtered out · 12 candidates" in page
    assert f"<title>crossrank: {QUERY}</title>" in page


def test_metadata_is_in_the_tooltip_and_the_hover_overlay(result: SearchResult) -> None:
    page = render_page(result)
    hits = [attrs for tag, attrs in _tags(page) if tag == "li"]
    assert len(hits) == 6
    first = result[0]
    title = hits[0]["title"]
    assert title is not None
    assert title.splitlines()[:2] == [f"id: {first.id}", f"path: {first.path}"]
    assert f"width: {first.metadata['width']}" in title.splitlines()
    assert f"sha256: {first.metadata['sha256']}" in title.splitlines()
    assert "li.hit:hover dl.meta{display:grid" in page
    assert f"<dt>sha256</dt><dd>{first.metadata['sha256']}</dd>" in page


def test_page_is_self_contained(result: SearchResult) -> None:
    page = render_page(result)
    tags = _tags(page)
    assert {tag for tag, _ in tags} <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "section",
        "h1",
        "p",
        "ol",
        "li",
        "div",
        "img",
        "dl",
        "dt",
        "dd",
        "span",
    }
    for _, attrs in tags:
        for name in ("src", "href", "action"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:"), value
    csp = next(
        a["content"]
        for t, a in tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    )
    assert csp == "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'"
    assert not re.search(r"url\(|@import|https?:", page.split("<style>")[1].split("</style>")[0])


def test_every_text_is_escaped(tmp_path: Path) -> None:
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    (tmp_path / "d").mkdir()
    hit = Hit(
        id=7,
        path=str(tmp_path / "d" / f"{evil}.png"),
        score=0.5,
        first_stage_score=0.25,
        rerank_score=None,
        metadata={"caption": evil, evil: 1},
    )
    page = render_page(
        _result([hit], query=evil), form=SearchForm(action="/", query=evil, filters=evil)
    )
    tags = _tags(page)
    assert "script" not in {tag for tag, _ in tags}
    assert not any(name.startswith("on") for _, attrs in tags for name in attrs)
    assert "<img" not in page  # the file does not exist: no image at all
    assert '<div class="missing">image unavailable</div>' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "rerank –" in page  # no reranker ran


def test_thumbnails_are_small_and_keep_the_aspect(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 300), (200, 30, 30)).save(big)
    uri = thumbnail_data_uri(big)
    assert uri is not None
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE // 4)
    assert len(uri) < 4000
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert thumbnail_data_uri(tmp_path / "broken.png") is None
    assert thumbnail_data_uri(tmp_path / "missing.png") is None


def test_page_names_the_encoder_and_what_ranked_each_query(result: SearchResult) -> None:
    import html

    page = render_page(result)
    encoder = result.encoder
    assert encoder is not None
    assert f'<p class="model">encoder: {html.escape(encoder.model_id)}' in page
    assert html.escape(f"reranker {result.reranker} · fusion {result.fusion}") in page
    assert "reranker maxsim" in page


def test_page_says_in_one_line_when_the_demo_encoder_is_in_use() -> None:
    import dataclasses
    import html

    from crossrank.encoders.describe import DEMO_NOTE, describe_model

    demo = describe_model({"model_id": "crossrank-demo", "source": "demo"})
    hit = Hit(id=1, path="/nowhere.png", score=0.5, first_stage_score=0.5, rerank_score=None)
    plain = _result([hit])
    shown = dataclasses.replace(plain, encoder=demo, notes=("the query was cut at 16 tokens",))
    page = render_page(shown)
    assert page.count(html.escape(DEMO_NOTE)) == 1
    assert "the query was cut at 16 tokens" in page
    # An explicit encoder wins; a page without one says nothing about it.
    assert html.escape(DEMO_NOTE) in render_page(plain, encoder=demo)
    assert 'class="model"' not in render_page(plain)


def test_hits_link_to_their_image_when_asked() -> None:
    hit = Hit(id=3, path="/x/a&b.png", score=0.5, first_stage_score=0.5, rerank_score=None)
    page = render_page(
        _result([hit]), image_src=lambda h: f"thumbnails/{h.id}?a=1&b=2", image_href=lambda h: "i"
    )
    assert '<a href="i"><img src="thumbnails/3?a=1&amp;b=2"' in page


def test_jpeg_thumbnail_of_any_format_is_a_small_oriented_jpeg(tmp_path: Path) -> None:
    from crossrank.errors import DecodeError

    buf = io.BytesIO()
    Image.new("RGBA", (40, 400), (10, 200, 30, 0)).save(buf, format="TIFF")
    thumb = Image.open(io.BytesIO(jpeg_thumbnail(buf.getvalue(), 100)))
    assert (thumb.format, thumb.size) == ("JPEG", (10, 100))
    assert thumb.getpixel((5, 50)) == pytest.approx((255, 255, 255), abs=3)  # alpha on white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown 90 degrees clockwise
    buf = io.BytesIO()
    Image.new("RGB", (300, 100), (0, 0, 255)).save(buf, format="JPEG", exif=exif)
    assert Image.open(io.BytesIO(jpeg_thumbnail(buf.getvalue(), 60))).size == (20, 60)
    for bad in (b"", b"not an image", buf.getvalue()[:200]):
        with pytest.raises(DecodeError):
            jpeg_thumbnail(bad)


def test_write_page_writes_utf8(result: SearchResult, tmp_path: Path) -> None:
    out = write_page(result, tmp_path / "page.html")
    assert out.read_text(encoding="utf-8") == render_page(result)


def test_cli_search_html_writes_the_page_beside_the_json(built_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.html"
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "search",
            str(built_index),
            QUERY,
            "-k",
            "3",
            "--device",
            "cpu",
            "--json",
            "--html",
            str(out),
        ],
    )
    assert res.exit_code == 0, (res.stdout, res.stderr)
    body = json.loads(res.stdout)  # stdout is still exactly the JSON
    page = out.read_text(encoding="utf-8")
    ids = [int(m) for m in re.findall(r'<li class="hit" [^>]*data-id="(\d+)"', page)]
    assert ids == [hit["id"] for hit in body["hits"]]
    assert page.count("<img ") == 3
    assert f"wrote {out}" in res.stderr

    bad = runner.invoke(
        cli,
        [
            "search",
            str(built_index),
            QUERY,
            "--device",
            "cpu",
            "--html",
            str(tmp_path / "no-such-dir" / "out.html"),
        ],
    )
    assert bad.exit_code == 1
    assert re.fullmatch(
        r"error: --html \S+out\.html cannot be written: No such file or directory\n", bad.stderr
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")
def test_saved_page_renders_every_thumbnail_in_chromium(
    result: SearchResult, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    write_page(result, site / "page.html")
    (site / "probe.html").write_text(PROBE.format(src="page.html"), encoding="utf-8")
    with static_server(site) as base:
        found = probe(f"{base}/probe.html", tmp_path / "chromium")
    assert found["title"] == f"crossrank: {QUERY}"
    assert found["hits"] == len(result) == 6
    assert len(found["images"]) == 6
    for image in found["images"]:
        assert image["src"].startswith("data:image/jpeg;base64,")
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")
def test_saved_page_screenshot_is_not_blank(result: SearchResult, tmp_path: Path) -> None:
    import subprocess

    page = write_page(result, tmp_path / "page.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            *chromium_args(tmp_path / "chromium"),
            "--window-size=900,600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (900, 600)
    assert (
        len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
    )  # thumbnails, not a blank page


def _explained(tokens: tuple[str, ...] = ("red", "circle")) -> SearchResult:
    import numpy as np

    from crossrank.hits import Explanation

    maps = np.zeros((len(tokens), 16), dtype=np.float32)
    maps[:, 5] = 1.0
    hits = [
        Hit(
            id=i,
            path=f"/nowhere/{i}.png",
            score=1.0,
            first_stage_score=0.5,
            rerank_score=1.0,
            metadata={"width": 40, "height": 32},
            explain=Explanation(tokens=tokens, grid=(4, 4), maps=maps),
        )
        for i in range(2)
    ]
    return _result(hits)


def test_explained_hits_get_word_chips_and_a_heat_map_per_word() -> None:
    page = render_page(_explained(), image_src=lambda hit: "data:image/jpeg;base64,AA==")
    tags = _tags(page)
    radios = [a for t, a in tags if t == "input" and a.get("type") == "radio"]
    assert [a["id"] for a in radios] == ["words-0-off", "words-0-0", "words-0-1"]
    labels = [a["for"] for t, a in tags if t == "label"]
    assert labels == ["words-0-off", "words-0-0", "words-0-1"]
    heat = [a for t, a in tags if t == "img" and "heat" in (a.get("class") or "")]
    assert len(heat) == 2 * 2 and [a["class"] for a in heat[:2]] == ["heat w0", "heat w1"]
    for a in heat:
        assert a["src"].startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert image.mode == "RGBA" and image.size[0] > image.size[1]  # the 40x32 aspect
        alpha = image.getchannel("A")
        assert alpha.getextrema()[0] == 0 < alpha.getextrema()[1]  # clear where it looked
    assert "<script" not in page and " on" not in re.sub(r'"[^"]*"', "", page)  # no handlers
    style = page.split("<style>")[1].split("</style>")[0]
    assert "input.w1:checked~ol .heat.w1" in style and "label.w1:hover~ol .heat.w1" in style


def test_word_chips_escape_the_tokens() -> None:
    page = render_page(
        _explained(("<script>x</script>", '"a')), image_src=lambda hit: "data:image/jpeg;base64,"
    )
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "&quot;a" in page


def test_a_page_without_explanations_has_no_chips(result: SearchResult) -> None:
    page = render_page(result)
    assert "words-0" not in page and 'class="heat' not in page

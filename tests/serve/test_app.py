"""The HTTP API through TestClient: search, filters, images, health, the page, errors, mounting."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ..conftest import committed_state, write_images

QUERY = "a red circle left of a blue square"


def _search(client, **body):
    return client.post("/search", json={"query": QUERY, **body})


def _one_line_422(response, match: str) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail
    assert match in detail, detail
    return detail


# -- search -----------------------------------------------------------------------------------


def test_search_returns_the_search_json_of_the_library(app, client) -> None:
    response = _search(client, k=5, rerank_k=12)
    assert response.status_code == 200
    body = response.json()
    expected = app.state.index.search(QUERY, k=5, rerank_k=12).to_dict()
    assert set(body) == set(expected)  # every key of the library's JSON, e.g. reranker, fusion
    assert {key: body[key] for key in ("encoder", "reranker", "fusion", "notes")} == {
        key: expected[key] for key in ("encoder", "reranker", "fusion", "notes")
    }
    assert body["query"] == QUERY
    assert body["generation"] == expected["generation"] == app.state.index.manifest.generation
    assert body["hits"] == expected["hits"]
    assert body["counts"] == expected["counts"]
    assert body["counts"]["requested"] == body["counts"]["returned"] == 5


def test_rerank_k_defaults_to_the_servers_and_covers_a_large_k(app) -> None:
    from fastapi.testclient import TestClient

    from crossrank.serve import create_app

    client = TestClient(create_app(app.state.index, reranker="maxsim"))
    assert _search(client, k=3).json()["counts"]["candidates"] == 24  # 100 asked, 24 images
    assert _search(client, k=2, rerank_k=12).json()["counts"]["candidates"] == 12
    assert _search(client, k=150).json()["counts"]["requested"] == 150


def test_structured_filters_cut_the_hits(app, client) -> None:
    paths = app.state.index.metadata(columns=["path"]).column("path").to_pylist()
    nested = [p for p in paths if "/nested/" in p]
    body = _search(
        client, k=20, rerank_k=30, filters={"path": {"contains": "/nested/"}, "width": {"ge": 1}}
    ).json()
    assert sorted(h["path"] for h in body["hits"]) == sorted(nested)
    assert body["counts"]["filtered_out"] == len(paths) - len(nested)
    body = _search(client, k=5, filters={"id": {"in": [3, 5]}}).json()
    assert sorted(h["id"] for h in body["hits"]) == [3, 5]
    assert body["counts"]["returned"] == 2


def test_a_filter_on_an_unknown_column_is_a_422_naming_the_columns(
    built_index: Path, client
) -> None:
    before = committed_state(built_index)
    _one_line_422(
        _search(client, filters={"colour": "red"}),
        'filters name an unknown column "colour"; the metadata '
        "columns are: id, path, sha256, width",
    )
    _one_line_422(
        _search(client, filters={"width": {"like": 3}}),
        'filter on "width" has an unknown operator "like"; the operators are: eq, ne, lt',
    )
    _one_line_422(
        _search(client, filters={"width": "wide"}),
        'column "width" is int32, so the value must be a number',
    )
    _one_line_422(_search(client, filters={"width": [1, 2]}), 'use {"in": [...]}')
    assert committed_state(built_index) == before
    assert _search(client, k=2).status_code == 200


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            b'{"query": "a cat", "k": ',
            "the body is not valid JSON at character 24: Expecting value",
        ),
        (b'{"query": "\xff"}', "the body is not valid JSON: it is not UTF-8"),
        (b"", 'the request has no JSON body; send {"query": "..."}'),
        (b'["a cat"]', "Input should be a valid dictionary"),
        (b'{"k": 3}', "query: Field required"),
        (b'{"query": "a cat", "k": 0}', "k: Input should be greater than or equal to 1"),
        (b'{"query": "a cat", "k": 5, "rerank_k": 2}', "rerank_k must be >= k"),
        (b'{"query": "a cat", "filter": {"width": 3}}', "filter: Extra inputs are not permitted"),
        (b'{"query": "a cat", "filters": [1]}', "filters: Input should be a valid dictionary"),
        (b'{"query": "   "}', "query is empty"),
    ],
)
def test_a_bad_body_is_a_422_with_the_reason(
    built_index: Path, client, body: bytes, match: str
) -> None:
    before = committed_state(built_index)
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    _one_line_422(response, match)
    assert isinstance(response.json()["errors"], list)
    assert committed_state(built_index) == before


def test_raw_where_is_refused_unless_the_server_allows_it(app, client, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from crossrank.serve import create_app

    response = _search(client, where="width > 0")
    assert response.status_code == 403
    assert "where (raw SQL) is disabled on this server" in response.json()["detail"]
    assert "--allow-where" in response.json()["detail"]

    trusted = TestClient(create_app(app.state.index, allow_where=True))
    body = _search(
        trusted, k=20, rerank_k=30, where="path LIKE '%/nested/%'", filters={"id": {"ge": 0}}
    ).json()
    assert body["hits"] and all("/nested/" in h["path"] for h in body["hits"])
    # Even trusted SQL is sandboxed: no file outside the index can be read or written.
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    _one_line_422(
        _search(trusted, where=f"id IN (SELECT a FROM read_csv('{secret}'))"), "Permission Error"
    )
    _one_line_422(
        _search(trusted, where="1; COPY (SELECT 1) TO 'x.csv'"), "is not a valid SQL expression"
    )


INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP VIEW metadata; --",
    "cat'); DROP TABLE metadata; --",
    "read_csv('{secret}')",
    "x' OR id IN (SELECT a FROM read_csv('{secret}')) OR '",
    "'; COPY (SELECT * FROM metadata) TO '{out}' (FORMAT csv); --",
    "%",
    "img\\_%",
]


@pytest.mark.parametrize("raw", INJECTIONS)
def test_injection_through_filters_matches_nothing_and_executes_nothing(
    app, client, tmp_path: Path, raw: str
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n2\n3\n")
    out = tmp_path / "stolen.csv"
    value = raw.format(secret=secret, out=out)
    before = app.state.index.metadata()
    for filters in (
        {"path": value},
        {"sha256": {"in": [value]}},
        {"path": {"contains": value}},
        {"path": {"ge": value, "le": value}},
    ):
        response = _search(client, k=5, filters=filters)
        assert response.status_code == 200, response.text
        assert response.json()["hits"] == []
        assert response.json()["counts"]["filtered_out"] == 24
    # as a column name it never reaches SQL: the schema check refuses it
    _one_line_422(_search(client, filters={value: "x"}), "unknown column")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]
    assert app.state.index.metadata().equals(before)


def test_concurrent_searches_agree_with_sequential_ones(client) -> None:
    queries = [QUERY, "a green triangle above a yellow star", "a purple square", "a cat"] * 2
    expected = [client.post("/search", json={"query": q, "k": 4}).json()["hits"] for q in queries]
    got: list = [None] * len(queries)

    def run(i: int) -> None:
        got[i] = client.post("/search", json={"query": queries[i], "k": 4}).json()["hits"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


# -- images, health, schema -------------------------------------------------------------------


def test_images_serves_the_file_of_an_indexed_id(app, client) -> None:
    row = app.state.index.metadata(columns=["id", "path", "sha256"]).to_pylist()[3]
    response = client.get(f"/images/{row['id']}")
    assert response.status_code == 200
    assert response.content == Path(row["path"]).read_bytes()
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["etag"] == f'"{row["sha256"]}"'
    head = client.head(f"/images/{row['id']}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png"
    assert head.headers["content-length"] == str(len(response.content))


@pytest.mark.parametrize("image_id", ["999", "-1", "9223372036854775807"])
@pytest.mark.parametrize("route", ["images", "thumbnails"])
def test_images_refuses_ids_not_in_the_index(client, image_id: str, route: str) -> None:
    response = client.get(f"/{route}/{image_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"no image with id {image_id} in this index"}
    assert client.head(f"/{route}/{image_id}").status_code == 404


@pytest.mark.parametrize("path", ["/images/abc", "/images/1.5", "/images/99999999999999999999"])
def test_images_refuses_what_is_not_an_int64_id(client, path: str) -> None:
    assert client.get(path).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd",
        "/images/%2e%2e%2fetc%2fpasswd",
        "/images/",
        "/images/1/../../../etc/passwd",
    ],
)
def test_images_cannot_be_walked_out_of(client, path: str) -> None:
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert b"root:" not in response.content


@pytest.fixture()
def few(tmp_path: Path, tiny_clip: Path):
    """Four indexed PNGs behind a private app: ``(client, {path: id}, paths)``; tests may damage
    the files."""
    from fastapi.testclient import TestClient

    from crossrank.serve import create_app
    from crossrank.write.build import build_index

    paths = write_images(tmp_path / "few", 4)
    build_index(tmp_path / "few", tmp_path / "few.idx", model=tiny_clip, device="cpu", workers=1)
    client = TestClient(create_app(tmp_path / "few.idx", device="cpu"))
    ids = {
        r["path"]: r["id"]
        for r in client.app.state.index.metadata(columns=["id", "path"]).to_pylist()
    }
    return client, ids, paths


def _gone(client, image_id: int, why: str) -> None:
    for route in ("images", "thumbnails"):
        response = client.get(f"/{route}/{image_id}")
        assert response.status_code == 410, (route, response.status_code, response.content[:80])
        detail = response.json()["detail"]
        assert f"the file of image {image_id} {why}" in detail and "\n" not in detail
        assert b"root:" not in response.content
        assert client.head(f"/{route}/{image_id}").status_code == 410


def test_images_of_a_file_gone_or_replaced_since_indexing_are_a_410(few, tmp_path: Path) -> None:
    import os

    client, ids, paths = few
    assert client.get(f"/images/{ids[str(paths[0])]}").status_code == 200
    paths[0].unlink()
    _gone(client, ids[str(paths[0])], "is no longer there")

    # An indexed file replaced by a symbolic link to a file outside: never followed out.
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 200)
    paths[1].unlink()
    paths[1].symlink_to(secret)
    _gone(client, ids[str(paths[1])], "changed since it was indexed")

    # Same size, other bytes (another image written over it), and a FIFO: refused, no hang.
    other = write_images(tmp_path / "other", 1, seed=7)[0].read_bytes()
    original = paths[2].read_bytes()
    paths[2].write_bytes((other + original)[: len(original)])
    _gone(client, ids[str(paths[2])], "changed since it was indexed (its content)")
    paths[3].unlink()
    os.mkfifo(paths[3])
    _gone(client, ids[str(paths[3])], "is no longer a regular file")


def test_a_symlink_to_the_very_indexed_bytes_is_served(few, tmp_path: Path) -> None:
    # Discovery indexes symbolic links to files: a link whose target still holds the indexed bytes
    # is the indexed file, checked by its hash.
    client, ids, paths = few
    kept = tmp_path / "kept.png"
    kept.write_bytes(paths[0].read_bytes())
    paths[0].unlink()
    paths[0].symlink_to(kept)
    response = client.get(f"/images/{ids[str(paths[0])]}")
    assert response.status_code == 200 and response.content == kept.read_bytes()


def test_thumbnails_are_small_jpegs_of_any_indexed_format(tmp_path: Path, tiny_clip: Path) -> None:
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from crossrank.serve import create_app
    from crossrank.write.build import build_index

    folder = tmp_path / "big"
    folder.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    pixels = rng.integers(0, 256, (600, 900, 3), dtype="uint8")
    Image.fromarray(pixels).save(folder / "large.png")  # over a megabyte of PNG
    Image.fromarray(pixels[:300, :200]).save(folder / "scan.tif")  # browsers cannot show a TIFF
    build_index(folder, tmp_path / "big.idx", model=tiny_clip, device="cpu", workers=1)
    client = TestClient(create_app(tmp_path / "big.idx", device="cpu"))
    rows = client.app.state.index.metadata(columns=["id", "path", "bytes"]).to_pylist()
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["large.png"]["bytes"] > 1_000_000

    for name, expected in (("large.png", (256, 171)), ("scan.tif", (171, 256))):
        response = client.get(f"/thumbnails/{by_name[name]['id']}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        assert len(response.content) < 100_000
        with Image.open(io.BytesIO(response.content)) as thumb:
            assert thumb.format == "JPEG" and thumb.size == expected
        head = client.head(f"/thumbnails/{by_name[name]['id']}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(response.content))
    small = client.get(f"/thumbnails/{by_name['large.png']['id']}", params={"size": 64})
    with Image.open(io.BytesIO(small.content)) as thumb:
        assert thumb.size == (64, 43)
    assert client.get(f"/images/{by_name['scan.tif']['id']}").headers["content-type"] == (
        "image/tiff"
    )
    for bad in (0, 15, 1025, "x"):
        response = client.get(f"/thumbnails/{by_name['large.png']['id']}", params={"size": bad})
        assert response.status_code == 422


def test_healthz_says_what_the_index_holds(app, client) -> None:
    from crossrank.encoders.describe import describe_model

    body = client.get("/healthz").json()
    index = app.state.index
    assert body == {
        "status": "ok",
        "images": 24,
        "generation": index.manifest.generation,
        "model": index.model_id,
        "encoder": describe_model(index.manifest.encoder).to_dict(),
        "columns": body["columns"],
    }
    assert body["encoder"]["model_id"] == index.model_id and body["encoder"]["demo"] is False
    assert body["columns"]["width"] == "int32"
    assert list(body["columns"]) == index.metadata_store.columns


def test_openapi_schema_describes_requests_responses_and_errors(client) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/search",
        "/images/{image_id}",
        "/thumbnails/{image_id}",
        "/healthz",
        "/",
    }
    search = spec["paths"]["/search"]["post"]
    assert set(search["responses"]) == {"200", "403", "422"}
    assert search["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ValidationErrorResponse"
    )
    request = spec["components"]["schemas"]["SearchRequest"]
    assert request["additionalProperties"] is False
    assert request["required"] == ["query"]
    filters = request["properties"]["filters"]["anyOf"][0]["additionalProperties"]["anyOf"][-1]
    assert sorted(filters["properties"]) == sorted(
        ["eq", "ne", "lt", "le", "gt", "ge", "in", "contains"]
    )
    assert filters["additionalProperties"] is False
    for route in ("/images/{image_id}", "/thumbnails/{image_id}"):
        assert set(spec["paths"][route]["get"]["responses"]) == {"200", "404", "410", "422"}


# -- the page ---------------------------------------------------------------------------------


def test_page_without_a_query_is_a_query_box(client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<form class="query" method="get" action="./">' in response.text
    assert "Search 24 images: type a query." in response.text
    assert "<img" not in response.text


def test_page_with_a_query_shows_the_hits_as_image_urls(app, client) -> None:
    response = client.get("/", params={"q": QUERY, "k": 5, "filters": '{"width": {"ge": 1}}'})
    assert response.status_code == 200
    expected = app.state.index.search(QUERY, k=5)
    for hit in expected:
        # Relative: small JPEGs from this app, whatever Host the request named.
        assert f'<a href="images/{hit.id}"><img src="thumbnails/{hit.id}?size=256"' in response.text
        assert f"first {hit.first_stage_score:.4f}" in response.text
    assert "testserver" not in response.text
    assert response.text.count("<img ") == 5
    assert f'value="{QUERY}"' in response.text


def test_page_shows_errors_escaped_in_the_page(client) -> None:
    response = client.get("/", params={"q": "<script>alert(1)</script>", "filters": '{"<b>": 1}'})
    assert response.status_code == 422
    assert "<script>alert" not in response.text and "<b>" not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "filters name an unknown column &quot;&lt;b&gt;&quot;" in response.text
    bad_json = client.get("/", params={"q": "a cat", "filters": "{width: 1}"})
    assert bad_json.status_code == 422 and "filters are not valid JSON" in bad_json.text
    bad_k = client.get("/", params={"q": "a cat", "k": 0})
    assert bad_k.status_code == 422 and "text/html" in bad_k.headers["content-type"]
    assert "k: Input should be greater than or equal to 1" in bad_k.text


def test_app_mounts_in_an_existing_backend(app) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    backend = FastAPI()

    @backend.get("/ping")
    def ping() -> dict:
        return {"pong": True}

    backend.mount("/photos", app)
    client = TestClient(backend)
    assert client.get("/ping").json() == {"pong": True}
    body = client.post("/photos/search", json={"query": QUERY, "k": 2}).json()
    assert len(body["hits"]) == 2
    assert client.get(f"/photos/images/{body['hits'][0]['id']}").status_code == 200
    page = client.get("/photos/", params={"q": QUERY, "k": 2}).text
    first = body["hits"][0]["id"]
    assert f'src="thumbnails/{first}?size=256"' in page  # relative to /photos/
    assert client.get(f"/photos/thumbnails/{first}?size=256").status_code == 200
    assert 'action="./"' in page and "testserver" not in page


def test_page_never_builds_urls_from_the_host_header(client) -> None:
    page = client.get("/", params={"q": QUERY, "k": 3}, headers={"host": "evil.example:666"}).text
    assert "evil.example" not in page


def test_page_names_the_encoder_and_what_ranked_the_hits(app, client) -> None:
    import html

    from crossrank.encoders.describe import describe_model

    encoder = describe_model(app.state.index.manifest.encoder)
    blank = client.get("/").text
    assert f"encoder: {html.escape(encoder.model_id)}" in blank
    result = app.state.index.search(QUERY, k=3, rerank_k=100)
    page = client.get("/", params={"q": QUERY, "k": 3}).text
    ranked = f"reranker {result.reranker} · fusion {result.fusion}"
    assert html.escape(ranked) in page


def test_page_and_healthz_say_in_one_line_when_the_demo_encoder_is_in_use(
    app, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import html

    from fastapi.testclient import TestClient

    from crossrank.encoders.describe import DEMO_NOTE

    index = app.state.index
    real = index.manifest
    demo = dataclasses.replace(
        real, encoder={**real.encoder, "model_id": "crossrank-demo", "source": "demo"}
    )
    monkeypatch.setattr(type(index), "manifest", property(lambda self: demo))
    client = TestClient(app)
    assert client.get("/healthz").json()["encoder"]["note"] == DEMO_NOTE
    assert html.escape(DEMO_NOTE) in client.get("/").text


def test_create_app_checks_its_arguments(app, tmp_path: Path) -> None:
    from crossrank.errors import IndexNotFoundError, InvalidArgumentError
    from crossrank.serve import create_app

    with pytest.raises(IndexNotFoundError):
        create_app(tmp_path / "nothing-here")
    with pytest.raises(
        InvalidArgumentError, match="rerank_k must be a positive number of candidates, got 0"
    ):
        create_app(app.state.index, rerank_k=0)
    # A reranker or fusion that would fail every request fails at start instead.
    with pytest.raises(InvalidArgumentError, match="reranker must be one of .* got 'colbert'"):
        create_app(app.state.index, reranker="colbert")
    with pytest.raises(InvalidArgumentError, match="fusion must be auto, .* got 'max'"):
        create_app(app.state.index, fusion="max")


def test_metadata_connection_is_sandboxed_once_loaded(app) -> None:
    import duckdb

    cur = app.state.index.metadata_store._cursor()
    with pytest.raises(duckdb.Error, match="(?i)locked|configuration"):
        cur.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="(?i)permission"):
        cur.execute(f"SELECT * FROM read_text('{json.__file__}')").fetchall()


def test_the_server_sees_what_another_writer_commits(
    index_copy: Path, tmp_path: Path, tiny_clip
) -> None:
    from fastapi.testclient import TestClient

    from crossrank import Index
    from crossrank.serve import create_app

    served = create_app(index_copy, device="cpu")
    writer = Index.open(index_copy, device="cpu", model=tiny_clip)
    with TestClient(served) as client:
        before = client.get("/healthz").json()
        removed = int(writer.metadata(columns=["id"]).column("id")[0].as_py())
        assert client.get(f"/images/{removed}").status_code == 200
        writer.remove([removed])
        after = client.get("/healthz").json()
        assert after["generation"] == before["generation"] + 1
        assert after["images"] == before["images"] - 1
        assert client.get(f"/images/{removed}").status_code == 404
        hits = client.post("/search", json={"query": QUERY, "k": after["images"]}).json()["hits"]
        assert removed not in {h["id"] for h in hits}
        assert len(hits) == after["images"]
    writer.close()

    frozen = create_app(index_copy, device="cpu", refresh=False)
    with TestClient(frozen) as client:
        generation = client.get("/healthz").json()["generation"]
        Index.open(index_copy, device="cpu", model=tiny_clip).remove(
            [int(frozen.state.index.metadata(columns=["id"]).column("id")[0].as_py())]
        )
        assert client.get("/healthz").json()["generation"] == generation  # refresh=False: no move

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
    assert set(body) == {"query", "hits", "counts", "timings_ms", "generation"}
    assert body["query"] == QUERY
    assert body["generation"] == expected["generation"] == app.state.index.manifest.generation
    assert body["hits"] == expected["hits"]
    assert body["counts"] == {"requested": 5, "returned": 5, "filtered_out": 0, "candidates": 12}


def test_rerank_k_defaults_to_the_servers_and_covers_a_large_k(client) -> None:
    assert _search(client, k=3).json()["counts"]["candidates"] == 24  # 100 asked, 24 images
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
    row = app.state.index.metadata(columns=["id", "path"]).to_pylist()[3]
    response = client.get(f"/images/{row['id']}")
    assert response.status_code == 200
    assert response.content == Path(row["path"]).read_bytes()
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("image_id", ["999", "-1", "9223372036854775807"])
def test_images_refuses_ids_not_in_the_index(client, image_id: str) -> None:
    response = client.get(f"/images/{image_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"no image with id {image_id} in this index"}


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


def test_images_of_a_file_gone_since_indexing_is_a_404(tmp_path: Path, tiny_clip: Path) -> None:
    from fastapi.testclient import TestClient

    from crossrank.serve import create_app
    from crossrank.write.build import build_index

    paths = write_images(tmp_path / "few", 2)
    build_index(tmp_path / "few", tmp_path / "few.idx", model=tiny_clip, device="cpu", workers=1)
    client = TestClient(create_app(tmp_path / "few.idx", device="cpu"))
    paths[1].unlink()
    ids = {
        r["path"]: r["id"]
        for r in client.app.state.index.metadata(columns=["id", "path"]).to_pylist()
    }
    assert client.get(f"/images/{ids[str(paths[0])]}").status_code == 200
    response = client.get(f"/images/{ids[str(paths[1])]}")
    assert response.status_code == 404
    assert "is no longer there" in response.json()["detail"]


def test_healthz_says_what_the_index_holds(app, client) -> None:
    body = client.get("/healthz").json()
    index = app.state.index
    assert body == {
        "status": "ok",
        "images": 24,
        "generation": index.manifest.generation,
        "model": index.model_id,
        "columns": body["columns"],
    }
    assert body["columns"]["width"] == "int32"
    assert list(body["columns"]) == index.metadata_store.columns


def test_openapi_schema_describes_requests_responses_and_errors(client) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/search", "/images/{image_id}", "/healthz", "/"}
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
    assert set(spec["paths"]["/images/{image_id}"]["get"]["responses"]) == {"200", "404", "422"}


# -- the page ---------------------------------------------------------------------------------


def test_page_without_a_query_is_a_query_box(client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<form class="query" method="get" action="http://testserver/">' in response.text
    assert "Search 24 images: type a query." in response.text
    assert "<img" not in response.text


def test_page_with_a_query_shows_the_hits_as_image_urls(app, client) -> None:
    response = client.get("/", params={"q": QUERY, "k": 5, "filters": '{"width": {"ge": 1}}'})
    assert response.status_code == 200
    expected = app.state.index.search(QUERY, k=5)
    for hit in expected:
        assert f'src="http://testserver/images/{hit.id}"' in response.text
        assert f"first {hit.first_stage_score:.4f}" in response.text
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
    assert f'src="http://testserver/photos/images/{body["hits"][0]["id"]}"' in page
    assert 'action="http://testserver/photos/"' in page


def test_create_app_checks_its_arguments(app, tmp_path: Path) -> None:
    from crossrank.errors import IndexNotFoundError, InvalidArgumentError
    from crossrank.serve import create_app

    with pytest.raises(IndexNotFoundError):
        create_app(tmp_path / "nothing-here")
    with pytest.raises(
        InvalidArgumentError, match="rerank_k must be a positive number of candidates, got 0"
    ):
        create_app(app.state.index, rerank_k=0)


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

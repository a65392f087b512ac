"""``explain`` over HTTP: off by default in POST /search, on for the result page."""

from __future__ import annotations

import pytest

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def maxsim_client(app):
    from fastapi.testclient import TestClient

    from crossrank.serve import create_app

    with TestClient(create_app(app.state.index, reranker="maxsim")) as c:
        yield c


def test_search_explains_only_when_asked(maxsim_client):
    plain = maxsim_client.post("/search", json={"query": QUERY, "k": 3}).json()
    told = maxsim_client.post("/search", json={"query": QUERY, "k": 3, "explain": True}).json()
    assert all("explain" not in hit for hit in plain["hits"])
    assert [h["score"] for h in told["hits"]] == [h["score"] for h in plain["hits"]]
    for hit in told["hits"]:
        ex = hit["explain"]
        rows, cols = ex["grid"]
        assert len(ex["maps"]) == len(ex["tokens"]) > 0
        assert all(len(m) == rows * cols and sum(m) == 1 for m in ex["maps"])


def test_search_explain_without_a_reranker_is_a_note(client):
    body = client.post("/search", json={"query": QUERY, "k": 2, "explain": True}).json()
    assert all("explain" not in hit for hit in body["hits"])
    assert any(note.startswith("explain:") for note in body["notes"])


def test_the_page_shows_word_chips_and_heat_maps(maxsim_client):
    page = maxsim_client.get("/", params={"q": QUERY, "k": 3}).text
    assert 'id="words-0-1"' in page and page.count('class="heat w0"') == 3
    assert "<script" not in page

"""The command line and the HTTP server on a sharded index: the same output as on the unsharded
index of the same files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from crossrank.cli import app

QUERY = "a red circle left of a blue square"


def _json(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_build_search_info_verify_from_the_command_line(
    pair, shard_source: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    index_dir = tmp_path / "cli.idx"
    built = _json(
        "build",
        str(shard_source),
        "--index",
        str(index_dir),
        "--shards",
        "2",
        "--model",
        str(tiny_clip),
        "--device",
        "cpu",
        "--batch-size",
        "8",
    )
    assert built["indexed"] == 41 and built["skipped"] == 2
    flat = pair[0]
    for args in ([QUERY], ["--image", str(shard_source / "img_010.png")]):
        common = [
            *args,
            "-k",
            "5",
            "--reranker",
            "maxsim",
            "--where",
            "width > 1",
            "--device",
            "cpu",
        ]
        a, b = _json("search", str(flat), *common), _json("search", str(index_dir), *common)
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        for g, h in zip(a["hits"], b["hits"], strict=True):
            assert abs(g["score"] - h["score"]) < 1e-4
        assert a["counts"] == b["counts"]
    info = _json("info", str(index_dir))
    assert info["counts"]["images"] == 41 and len(info["shards"]) == 2
    assert sum(s["images"] for s in info["shards"]) == 41
    assert info["routing"] == {"rule": "id_mod_n", "n_shards": 2}
    ids = "3,7,12,20,33"  # a backend's candidates, reranked where their patches live
    common = [QUERY, "--ids", ids, "-k", "3", "--reranker", "maxsim", "--device", "cpu"]
    a, b = _json("rerank", str(flat), *common), _json("rerank", str(index_dir), *common)
    assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]] and len(b["hits"]) == 3
    checked = _json("verify", str(index_dir))
    assert checked["ok"] and checked["images"] == 41 and checked["files_hashed"] > 0
    removed = _json("remove", str(index_dir), "--ids", "0,1")
    assert removed["removed"] == [0, 1] and removed["images"] == 39
    compacted = _json("compact", str(index_dir))
    assert compacted["committed"] and compacted["dropped"] == 2


def test_serve_answers_from_a_sharded_index(pair) -> None:
    from fastapi.testclient import TestClient

    import crossrank
    from crossrank.serve import create_app

    flat, sharded = pair
    client = TestClient(create_app(sharded, device="cpu", reranker="maxsim", fusion="sum"))
    got = client.post("/search", json={"query": QUERY, "k": 4, "rerank_k": 10})
    assert got.status_code == 200, got.text
    with crossrank.open(flat, device="cpu") as a:
        want = a.search(QUERY, k=4, rerank_k=10, reranker="maxsim", fusion="sum")
    assert [h["id"] for h in got.json()["hits"]] == [h.id for h in want]
    image = client.get(f"/images/{want[0].id}")
    assert image.status_code == 200 and image.content
    assert client.get("/images/999").status_code == 404

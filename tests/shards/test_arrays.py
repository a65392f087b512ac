"""A sharded index from a backend's arrays equals the unsharded build_from_arrays index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import crossrank
from crossrank.errors import InvalidArgumentError
from crossrank.shards import build_sharded_from_arrays, read_shards_manifest
from crossrank.write import build_from_arrays

from .test_equality import assert_same


def _arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    patches = rng.standard_normal((n, 16, 32)).astype(np.float16)
    meta = {"path": [f"item-{i}" for i in range(n)], "price": rng.integers(0, 100, n)}
    return xb, patches, meta


@pytest.mark.parametrize("ids", [None, "scattered"])
def test_arrays_give_the_same_searches(tmp_path: Path, tiny_clip: Path, ids) -> None:
    xb, patches, meta = _arrays(60)
    given = None if ids is None else np.random.default_rng(1).permutation(1000)[:60] * 7 + 3
    kw = {"ids": given, "model": tiny_clip}
    build_from_arrays(tmp_path / "flat.idx", xb, patches, meta, **kw)
    report = build_sharded_from_arrays(tmp_path / "s.idx", xb, patches, meta, shards=4, **kw)
    assert report.indexed == 60 and report.generation == 1
    top = read_shards_manifest(tmp_path / "s.idx")
    expected_ids = np.arange(60) if given is None else given
    assert top.next_id == int(expected_ids.max()) + 1
    with (
        crossrank.open(tmp_path / "flat.idx", device="cpu") as a,
        crossrank.open(tmp_path / "s.idx", device="cpu") as b,
    ):
        assert sorted(b.metadata(columns=["id"]).column("id").to_pylist()) == sorted(
            expected_ids.tolist()
        )
        for x, y in zip(
            a.search_vectors(xb[:5], k=10, where="price < 50"),
            b.search_vectors(xb[:5], k=10, where="price < 50"),
            strict=True,
        ):
            assert_same(x, y)
        kw2 = {"k": 5, "rerank_k": 20, "reranker": "maxsim", "fusion": "sum"}
        assert_same(a.search("a red circle", **kw2), b.search("a red circle", **kw2))


def test_arrays_that_leave_a_shard_empty_are_refused(tmp_path: Path) -> None:
    xb, patches, _ = _arrays(6)
    info = {"model_id": "my-backend"}
    with pytest.raises(InvalidArgumentError, match="no id falls to shard 1"):
        build_sharded_from_arrays(
            tmp_path / "s.idx", xb, patches, shards=2, ids=np.arange(6) * 2, encoder_info=info
        )
    with pytest.raises(InvalidArgumentError, match="--shards 7 is more than the 6 images"):
        build_sharded_from_arrays(tmp_path / "s.idx", xb, patches, shards=7, encoder_info=info)
    assert not (tmp_path / "s.idx").exists()

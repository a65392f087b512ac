"""A sharded index built on Ray and served by one Ray actor per shard, on a real local Ray cluster
(2 CPUs): the same hits, order, scores and counts as the unsharded one-process index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.distributed.conftest import BATCH

pytestmark = pytest.mark.ray

#: More shards than the cluster's 2 CPUs: actors share them.
N_SHARDS = 3


def test_the_ray_sharded_build_routes_the_one_process_ids(sharded: Path, local_build: Path) -> None:
    from crossrank.shards import read_shards_manifest
    from tests.distributed.conftest import index_contents

    top = read_shards_manifest(sharded)
    want = index_contents(local_build)
    assert top.counts["images"] == want["counts"]["images"]
    for ref in top.shards:
        got = index_contents(Path(ref.path))
        rows = want["ids"] % N_SHARDS == ref.index
        np.testing.assert_array_equal(got["ids"], want["ids"][rows])
        np.testing.assert_allclose(got["vectors"], want["vectors"][rows], rtol=0, atol=1e-5)
        assert got["metadata"].equals(want["metadata"].filter(pa.array(rows)))


@pytest.fixture(scope="module")
def sharded(ray_cluster, tmp_path_factory: pytest.TempPathFactory, shapes_manifest: Path) -> Path:
    """``shapes_manifest`` built on Ray into 3 shards (more than the cluster's 2 CPUs)."""
    from crossrank.distributed import build_on_ray

    path = tmp_path_factory.mktemp("ray-sharded") / "sharded.idx"
    report = build_on_ray(shapes_manifest, path, shards=N_SHARDS, device="cpu", batch_size=BATCH)
    assert (report.indexed, report.skipped, report.duplicates) == (60, 2, 1)
    return path


def _query_image(shapes_manifest: Path) -> Path:
    return next((shapes_manifest.parent / "shapes" / "images").glob("000004.png"))


#: Searches compared: the first stage alone, reranked, filtered, both.
SEARCHES = [
    {},
    {"reranker": "maxsim"},
    {"where": "label IN ('label-1', 'label-3')"},
    {"where": "label = 'label-2'", "reranker": "maxsim", "k": 4},
]


def test_actors_per_shard_search_like_the_unsharded_index(
    ray_cluster, sharded: Path, local_build: Path, shapes_manifest: Path
) -> None:
    import crossrank
    from crossrank.distributed import ActorShard, open_on_ray

    queries: list = ["a red circle", "a blue square left of a green triangle"]
    queries.append(_query_image(shapes_manifest))
    with (
        open_on_ray(sharded, device="cpu") as on_ray,
        crossrank.open(local_build, device="cpu") as one,
    ):
        assert all(isinstance(s, ActorShard) for s in on_ray.view.shards)
        assert len(on_ray.view.shards) == N_SHARDS
        for kwargs in SEARCHES:
            kwargs = {"k": 8, **kwargs}
            for query in queries:
                got, want = on_ray.search(query, **kwargs), one.search(query, **kwargs)
                what = f"{query} {kwargs}"
                assert got.hits, f"{what}: a query with no hits cannot tell the two apart"
                assert [h.id for h in got.hits] == [h.id for h in want.hits], what
                assert [h.path for h in got.hits] == [h.path for h in want.hits], what
                for g, w in zip(got.hits, want.hits, strict=True):
                    assert g.score == pytest.approx(w.score, abs=1e-4), what
                assert got.counts == want.counts, what
    assert ray_cluster.is_initialized()  # a runtime the caller started is left running


def test_a_missing_shard_is_named_by_its_actor(ray_cluster, sharded: Path, tmp_path: Path) -> None:
    from crossrank.distributed import open_on_ray
    from crossrank.errors import IndexNotFoundError

    copy = Path(shutil.copytree(sharded, tmp_path / "copy.idx"))
    shutil.rmtree(copy / "shard-001")
    with pytest.raises(IndexNotFoundError, match=r"shard 1 \(.*shard-001\) is missing") as info:
        open_on_ray(copy, device="cpu")
    assert "\n" not in str(info.value)


def test_an_unsharded_index_is_refused_in_one_line(ray_cluster, local_build: Path) -> None:
    from crossrank.distributed import open_on_ray
    from crossrank.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="is an unsharded index; --engine ray serves"):
        open_on_ray(local_build)


def test_shard_actors_rerank_at_the_precision_asked(
    ray_cluster, sharded: Path, tmp_path: Path
) -> None:
    """``open_on_ray(precision=...)`` reaches each actor, which loads the named reranker at it:
    bfloat16 moves the rerank scores a little; a bad value is one line before any actor."""
    import torch

    from crossrank.distributed import open_on_ray
    from crossrank.errors import InvalidArgumentError
    from crossrank.rerank import CrossAttentionReranker, RerankerConfig
    from crossrank.rerank.checkpoint import save_reranker
    from crossrank.shards import read_shards_manifest

    dim = int(read_shards_manifest(sharded).encoder["patch_dim"])
    torch.manual_seed(0)
    model = CrossAttentionReranker(RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2))
    folder = str(save_reranker(model, tmp_path / "rr"))
    scores = {}
    for precision in ("auto", "bfloat16"):
        with open_on_ray(sharded, device="cpu", precision=precision) as on_ray:
            got = on_ray.search("a red circle", k=6, rerank_k=12, reranker=folder)
        assert got.reranker.endswith("bfloat16") == (precision == "bfloat16")
        scores[precision] = {h.id: h.rerank_score for h in got.hits}
    common = scores["auto"].keys() & scores["bfloat16"].keys()
    assert common
    assert max(abs(scores["auto"][i] - scores["bfloat16"][i]) for i in common) > 0
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        open_on_ray(sharded, device="cpu", precision="fp8")

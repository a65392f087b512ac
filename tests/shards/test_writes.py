"""add, remove, compact and verify on a sharded index: the same results as on the unsharded
index after every step, only changed shards rewritten, readers isolated, old generations
collected."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import crossrank
from crossrank.shards import read_shards_manifest
from crossrank.store import list_generations

from ..conftest import write_images
from .test_equality import assert_same


def _same_everywhere(a, b, queries) -> None:
    cols = ["id", "path", "sha256"]
    assert a.metadata(columns=cols).equals(b.metadata(columns=cols))
    assert len(a) == len(b)
    for q in queries:
        for reranker in ("none", "maxsim"):
            kw = {"k": 10, "rerank_k": 25, "reranker": reranker, "fusion": "sum"}
            assert_same(a.search(q, **kw), b.search(q, **kw))
    assert b.verify() == []


def test_add_remove_compact_equal_the_unsharded_index(
    shard_source: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    from crossrank.shards import build_sharded
    from crossrank.write.build import build_index

    source = Path(shutil.copytree(shard_source, tmp_path / "src"))
    kw = {"model": tiny_clip, "device": "cpu", "batch_size": 8, "workers": 2}
    build_index(source, tmp_path / "flat.idx", **kw)
    build_sharded(source, tmp_path / "sharded.idx", shards=3, **kw)
    a = crossrank.open(tmp_path / "flat.idx", device="cpu")
    b = crossrank.open(tmp_path / "sharded.idx", device="cpu")
    queries = ["a red circle left of a blue square", source / "img_001.png"]
    write_images(source / "new", 7, seed=77)
    (source / "img_003.png").rename(source / "moved_3.png")  # a move keeps its id
    shutil.copy(source / "new" / "img_000.png", source / "img_005.png")  # a changed file
    (source / "more" / "img_009.png").unlink()  # a deleted file stays indexed (add only adds)
    ra, rb = a.add(source), b.add(source)
    skip = {"index": "", "seconds": 0}
    assert ra.to_dict() | skip == rb.to_dict() | skip
    assert (rb.added, rb.moved, rb.replaced) == (7, 1, 1) and rb.images == len(b) == 47
    _same_everywhere(a, b, queries)
    ra, rb = a.add(source), b.add(source)  # the same add again: nothing to do
    assert ra.to_dict() | skip == rb.to_dict() | skip and not rb.committed

    for kw in ({"ids": [1, 2, 44, 45]}, {"where": "path LIKE '%/more/%'"}):
        ra, rb = a.remove(**kw), b.remove(**kw)
        assert (ra.removed, ra.images, ra.tombstones) == (rb.removed, rb.images, rb.tombstones)
        _same_everywhere(a, b, queries)
    assert b.remove(ids=[1]).committed is False  # removed before: nothing to commit

    ra, rb = a.compact(), b.compact()
    assert (ra.images, ra.dropped) == (rb.images, rb.dropped) and rb.committed
    assert b.info()["tombstones"] == 0
    _same_everywhere(a, b, queries)


def test_an_add_rewrites_only_the_shards_it_changes(pair_copy, shard_source, tmp_path) -> None:
    _, sharded = pair_copy
    before = read_shards_manifest(sharded)
    source = tmp_path / "one"
    write_images(source, 1, seed=99)
    report = crossrank.shards.add_sharded(source, sharded, device="cpu")
    after = read_shards_manifest(sharded)
    assert report.added == 1 and after.generation == before.generation + 1
    new_id = before.next_id  # 41: shard 41 % 3 = 2
    assert after.next_id == new_id + 1
    changed = [r.index for r, s in zip(before.shards, after.shards, strict=True) if r != s]
    assert changed == [new_id % 3]
    with crossrank.open(sharded, device="cpu") as b:
        assert b.search(source / "img_000.png", k=1)[0].id == new_id
    for ref in after.shards:  # no reader held them: the old generations are gone
        assert [g.number for g in list_generations(ref.path)] == [ref.generation]


def test_a_reader_keeps_its_generation_until_it_refreshes(pair_copy) -> None:
    _, sharded = pair_copy
    reader = crossrank.open(sharded, device="cpu")
    first = reader.search("a red circle", k=41)
    top = first[0].id
    crossrank.shards.remove_sharded(sharded, ids=[top])
    again = reader.search("a red circle", k=41)  # the old set of shard generations, still whole
    assert [h.id for h in again] == [h.id for h in first] and again.generation == first.generation
    kept = read_shards_manifest(sharded)
    old = {r.index: r.generation for r in reader.view.top.shards}
    for ref in kept.shards:  # the reader's pins keep the old generation of the changed shard
        assert old[ref.index] in [g.number for g in list_generations(ref.path)]
    assert reader.refresh()
    moved = reader.search("a red circle", k=41)
    assert top not in [h.id for h in moved] and len(moved) == 40
    reader.close()
    crossrank.shards.collect_shards(sharded)  # what the next writer does first
    for ref in kept.shards:  # the reader let go: collected
        assert [g.number for g in list_generations(ref.path)] == [ref.generation]


def test_bad_ids_and_filters_change_nothing(pair_copy) -> None:
    from crossrank.errors import FilterError, InvalidArgumentError

    _, sharded = pair_copy
    before = (sharded / "shards.json").read_bytes()
    with pytest.raises(InvalidArgumentError, match="not in index .*: 41"):
        crossrank.shards.remove_sharded(sharded, ids=[0, 41])
    with pytest.raises(FilterError):
        crossrank.shards.remove_sharded(sharded, where="no_such_column > 1")
    with pytest.raises(InvalidArgumentError, match="not both"):
        crossrank.shards.remove_sharded(sharded, ids=[1], where="id = 1")
    assert (sharded / "shards.json").read_bytes() == before
    assert np.array_equal(
        crossrank.open(sharded, device="cpu").metadata(columns=["id"]).column("id").to_numpy(),
        np.arange(41),
    )


def test_readers_never_see_a_half_applied_write(pair_copy) -> None:
    """Each removal takes one image from every shard; readers opening or refreshing meanwhile
    see 41, 38, 35, ... images, never a count in between."""
    import threading

    _, sharded = pair_copy
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    allowed = {41 - 3 * i for i in range(len(batches) + 1)}
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        held = crossrank.open(sharded, device="cpu")
        try:
            while not done.is_set():
                with crossrank.open(sharded, device="cpu") as fresh:
                    seen.append(len(fresh.search_vectors(np.ones((1, 32), np.float32), k=50)[0]))
                held.refresh()
                seen.append(len(held.metadata(columns=["id"])))
        except BaseException as e:
            errors.append(e)
        finally:
            held.close()

    # What the reader imports lazily is imported here first: CPython 3.11.7 can raise
    # "SystemError: AST constructor recursion depth mismatch" when two threads compile sources at
    # once (no bytecode cache under PYTHONDONTWRITEBYTECODE), which is not what this test is about.
    with crossrank.open(sharded, device="cpu") as warm:
        warm.search_vectors(np.ones((1, 32), np.float32), k=1)
        warm.metadata(columns=["id"])
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for ids in batches:
            crossrank.shards.remove_sharded(sharded, ids=ids)
    finally:
        done.set()
        reader.join(60)
    assert not errors, errors
    assert seen and set(seen) <= allowed, sorted(set(seen))

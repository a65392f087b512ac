"""Living indexes through the Python API: add, remove, compact, refresh, and what they share."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crossrank import (
    Index,
    IndexLockedError,
    IndexNotFoundError,
    InvalidArgumentError,
    ModelMismatchError,
)
from crossrank.errors import SourceError
from crossrank.store import Generation, WriterLock, list_generations
from crossrank.write import add_images, compact_index, remove_images
from crossrank.write.build import build_index

from .._living import assert_sound, index_state
from ..conftest import committed_state, write_images

# The fixtures living (private source and index), shared_living and index_only (a private copy of
# a shared index) are the root conftest's: 6 source images, seed 40 (its living_images).


def _by_path(index_dir: Path) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """``{path: (id, vector, patches)}`` of the live images of the current generation."""
    gen = Generation.current(index_dir)
    live = gen.live_ids()
    rows = gen.rows_of_ids(live)
    vectors, patches = np.asarray(gen.vectors()[rows]), gen.patches().gather(rows)
    with gen.metadata() as meta:
        paths = dict(
            zip(
                meta.table(columns=["id", "path"]).column("id").to_pylist(),
                meta.table(columns=["id", "path"]).column("path").to_pylist(),
                strict=True,
            )
        )
    return {paths[i]: (i, vectors[j], patches[j]) for j, i in enumerate(live.tolist())}


def _found(index: Index, index_dir: Path, image_id: int) -> list[int]:
    """Ids of the top hits when searching by the stored vector of ``image_id``."""
    gen = Generation.current(index_dir)
    xq = np.asarray(gen.vectors()[gen.rows_of_ids(np.array([image_id]))])
    return [h.id for h in index.search_vectors(xq, k=3)[0]]


# -- add -------------------------------------------------------------------------------------------


def test_add_indexes_only_new_files_exactly_as_a_build_would(living, tmp_path, tiny_clip):
    source, index_dir = living
    before = _by_path(index_dir)
    write_images(source / "new", 3, seed=41)
    report = add_images(source, index_dir, device="cpu", workers=1)
    assert (report.committed, report.added, report.unchanged, report.moved, report.generation) == (
        True,
        3,
        6,
        0,
        2,
    )
    assert report.images == 9
    after = _by_path(index_dir)
    assert {p: v[0] for p, v in after.items() if p in before} == {
        p: v[0] for p, v in before.items()
    }
    assert sorted(v[0] for p, v in after.items() if p not in before) == [
        6,
        7,
        8,
    ]  # new ids after the old
    fresh = tmp_path / "fresh.idx"
    build_index(source, fresh, model=tiny_clip, device="cpu", batch_size=4, workers=1)
    for path, (_, vector, patches) in _by_path(fresh).items():  # the same features as a full build
        np.testing.assert_allclose(after[path][1], vector, atol=1e-5)
        np.testing.assert_allclose(
            after[path][2].astype(np.float32), patches.astype(np.float32), atol=1e-2
        )
    assert_sound(index_dir)


def test_add_links_unchanged_segments_instead_of_rewriting_them(living):
    source, index_dir = living
    reader = Index.open(index_dir, device="cpu")  # holds generation 1, so it stays to compare with
    write_images(source / "new", 2, seed=42)
    add_images(source, index_dir, device="cpu", workers=1)
    old, new = Generation(index_dir / "gen-000001"), Generation.current(index_dir)
    for part in (
        old.info.patch_shards + old.info.metadata_parts
    ):  # hard links: the same inode, no copy
        assert os.stat(old.path / part.file).st_ino == os.stat(new.path / part.file).st_ino
    assert [s.rows for s in new.info.patch_shards] == [s.rows for s in old.info.patch_shards] + [2]
    assert len(reader) == 6 and reader.generation == 1
    reader.close()


def test_add_twice_commits_once(living):
    source, index_dir = living
    write_images(source / "new", 2, seed=43)
    assert add_images(source, index_dir, device="cpu").committed
    again = add_images(source, index_dir, device="cpu")
    assert (again.committed, again.added, again.unchanged, again.generation) == (False, 0, 8, 2)


def test_moved_file_keeps_its_id_and_gets_its_new_path(living):
    source, index_dir = living
    before = _by_path(index_dir)
    old = source / "img_002.png"
    image_id = before[str(old)][0]
    (source / "moved").mkdir()
    old.rename(source / "moved" / "renamed.png")
    report = add_images(source, index_dir, device="cpu")
    assert (report.moved, report.added, report.replaced) == (1, 0, 0)
    after = _by_path(index_dir)
    assert str(old) not in after and after[str(source / "moved" / "renamed.png")][0] == image_id
    with Index.open(index_dir, device="cpu") as index:
        hit = index.search_vectors(before[str(old)][1][None, :], k=1)[0][0]
        assert (hit.id, hit.path) == (image_id, str(source / "moved" / "renamed.png"))
    assert_sound(index_dir)


def test_a_changed_file_is_indexed_anew_and_its_old_image_removed(living):
    source, index_dir = living
    target = source / "img_004.png"
    old_id = _by_path(index_dir)[str(target)][0]
    shutil.copy(write_images(source.parent / "other", 1, seed=44)[0], target)
    report = add_images(source, index_dir, device="cpu")
    assert (report.added, report.replaced, report.images) == (1, 1, 6)
    after = _by_path(index_dir)
    assert after[str(target)][0] == 6  # the path now names the new image, under a new id
    with Index.open(index_dir, device="cpu") as index:
        assert old_id not in _found(index, index_dir, after[str(target)][0])
    assert_sound(index_dir)


def test_add_from_a_manifest_fills_missing_columns_and_refuses_unknown_ones(tmp_path, tiny_clip):
    images = write_images(tmp_path / "pics", 4, seed=45)
    first = tmp_path / "first.csv"
    with first.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["path", "label"], [images[0].name, "cat"], [images[1].name, "dog"]]
        )
    index_dir = tmp_path / "m.idx"
    (tmp_path / "pics" / "first.csv").write_text(first.read_text())
    build_index(tmp_path / "pics" / "first.csv", index_dir, model=tiny_clip, device="cpu")
    folder_report = add_images(tmp_path / "pics", index_dir, device="cpu")  # a folder has no label
    assert folder_report.added == 2
    with Index.open(index_dir, device="cpu") as index:
        labels = dict(
            zip(*index.metadata(columns=["path", "label"]).to_pydict().values(), strict=True)
        )
        assert labels == {
            str(images[0]): "cat",
            str(images[1]): "dog",
            str(images[2]): None,
            str(images[3]): None,
        }
    extra = tmp_path / "pics" / "extra.csv"
    extra.write_text(
        f"path,label,rating\n{write_images(tmp_path / 'pics' / 'x', 1, seed=46)[0]},bird,5\n"
    )
    before = committed_state(index_dir)
    with pytest.raises(
        SourceError, match=r"has column\(s\) rating that the index's metadata lacks"
    ):
        add_images(extra, index_dir, device="cpu")
    assert committed_state(index_dir) == before


# -- remove -------------------------------------------------------------------------------------


def test_removed_images_are_not_found_counted_or_listed(index_only):
    _, index_dir = index_only
    with Index.open(index_dir, device="cpu") as index:
        assert 3 in _found(index, index_dir, 3)
        report = index.remove([3, 1])
        assert (report.removed, report.images, report.tombstones, report.generation) == (
            (1, 3),
            4,
            2,
            2,
        )
        assert index.generation == 2 and len(index) == 4
        assert 3 not in _found(index, index_dir, 3)
        result = index.search("a red circle", k=10, reranker="maxsim")
        assert sorted(h.id for h in result) == [0, 2, 4, 5] and result.generation == 2
        filtered = index.search("a red circle", k=10, where="id >= 1", reranker=None)
        assert sorted(h.id for h in filtered) == [2, 4, 5] and filtered.counts.filtered_out == 1
        assert index.metadata(columns=["path"]).num_rows == 4
        assert index.metadata(where="id < 3").column("id").to_pylist() == [0, 2]
        info = index.info()
        assert (info["counts"]["images"], info["counts"]["tombstones"], info["tombstones"]) == (
            4,
            2,
            2,
        )
        assert info["first_stage"]["ntotal"] == 6  # stored until a compaction
    assert_sound(index_dir)


def test_remove_by_where(index_only):
    _, index_dir = index_only
    report = remove_images(index_dir, where="path LIKE '%img_00_.png' AND id % 2 = 0")
    assert report.removed == (0, 2, 4)
    assert sorted(index_state(index_dir).images) == [1, 3, 5]
    assert remove_images(index_dir, where="id % 2 = 0").committed is False  # nothing left to remove


def test_removing_unknown_ids_names_them_and_changes_nothing(index_only):
    _, index_dir = index_only
    before = committed_state(index_dir)
    with pytest.raises(
        InvalidArgumentError,
        match=r"2 of the 3 ids are not in index .*: 6, 99; nothing was removed",
    ):
        remove_images(index_dir, ids=[99, 2, 6])
    assert committed_state(index_dir) == before


def test_removing_again_reports_the_ids_as_already_removed(index_only):
    _, index_dir = index_only
    remove_images(index_dir, ids=[2])
    again = remove_images(index_dir, ids=[2, 4])
    assert (again.removed, again.already_removed, again.generation) == ((4,), (2,), 3)
    assert remove_images(index_dir, ids=[2, 4]).committed is False


@pytest.mark.parametrize("kwargs", [{}, {"ids": [1], "where": "id = 1"}], ids=["neither", "both"])
def test_remove_needs_ids_or_where(index_only, kwargs):
    with pytest.raises(
        InvalidArgumentError, match="as ids or as a where filter, not both and not neither"
    ):
        remove_images(index_only[1], **kwargs)


def test_remove_keeps_every_file_but_the_tombstones_shared(index_only):
    _, index_dir = index_only
    with Index.open(index_dir, device="cpu"):  # keeps generation 1 to compare with
        remove_images(index_dir, ids=[0])
        old, new = Generation(index_dir / "gen-000001"), Generation.current(index_dir)
        shared = [p for p in os.listdir(old.path) if p != "generation.json"]
        assert all(os.stat(old.path / p).st_ino == os.stat(new.path / p).st_ino for p in shared)
        assert sorted(os.listdir(new.path)) == sorted([*os.listdir(old.path), "tombstones.npy"])


# -- compact ------------------------------------------------------------------------------------


def test_compact_drops_tombstones_and_keeps_ids_and_results(living, tiny_clip):
    source, index_dir = living
    remove_images(index_dir, ids=[0, 4])
    xq = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    with Index.open(index_dir, device="cpu") as index:
        want = index.search_vectors(xq, k=4)
        report = index.compact()
        assert (report.committed, report.dropped, report.images, report.generation) == (
            True,
            2,
            4,
            3,
        )
        got = index.search_vectors(xq, k=4)
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in want]
        np.testing.assert_allclose(
            [[h.score for h in r] for r in got], [[h.score for h in r] for r in want], atol=1e-6
        )
    gen = Generation.current(index_dir)
    assert (
        gen.ids().tolist() == [1, 2, 3, 5] and gen.tombstones().size == 0 and gen.info.n_images == 4
    )
    assert [g.number for g in list_generations(index_dir)] == [3]  # nobody holds the old ones
    # remove drops images from the index, not from disk: an add of a source that still holds the
    # two removed files indexes them again, under new ids; removed ids are never given again.
    write_images(source / "new", 1, seed=47)
    assert add_images(source, index_dir, device="cpu").added == 3
    assert sorted(index_state(index_dir).images) == [1, 2, 3, 5, 6, 7, 8]
    assert_sound(index_dir)


def test_compact_without_tombstones_only_deletes_old_generations(index_only):
    _, index_dir = index_only
    reader = Index.open(index_dir, device="cpu")
    remove_images(index_dir, ids=[1])
    kept = compact_index(index_dir)
    assert kept.committed and kept.kept_generations == (1,)  # the reader holds generation 1
    reader.close()
    report = compact_index(index_dir)
    assert (report.committed, report.deleted_generations, report.generation) == (False, (1,), 3)
    assert [g.number for g in list_generations(index_dir)] == [3]


def test_an_index_with_everything_removed_still_works(living):
    source, index_dir = living
    remove_images(index_dir, where="true")
    compact_index(index_dir)
    with Index.open(index_dir, device="cpu") as index:
        assert len(index) == 0 and list(index.search("a red circle", k=3)) == []
    assert_sound(index_dir)
    os.utime(source / "img_000.png")  # seen again: indexed anew
    assert add_images(source, index_dir, device="cpu", rehash=True).added == 6
    assert sorted(index_state(index_dir).images) == list(range(6, 12))


# -- readers and writers ------------------------------------------------------------------------


def test_an_open_index_keeps_its_generation_until_refresh(index_only):
    _, index_dir = index_only
    reader = Index.open(index_dir, device="cpu")
    assert reader.refresh() is False
    remove_images(index_dir, ids=[5])
    assert len(reader) == 6 and 5 in _found(reader, index_dir, 5)  # still the generation it opened
    assert (index_dir / "gen-000001").is_dir()  # pinned: the writer left it
    assert reader.refresh() is True and reader.generation == 2 and len(reader) == 5
    assert 5 not in _found(reader, index_dir, 5)
    remove_images(index_dir, ids=[4])  # the next writer deletes what nobody holds any more
    assert [g.number for g in list_generations(index_dir)] == [2, 3]
    reader.close()
    with pytest.raises(Exception, match="was closed"):
        reader.search_vectors(np.ones((1, 32), np.float32), k=1)


def test_a_second_writer_is_refused_naming_the_first(index_only):
    source, index_dir = index_only
    before = committed_state(index_dir)
    with WriterLock(index_dir, command="crossrank compact photos.idx"):
        with pytest.raises(
            IndexLockedError, match=r"being written by another writer of this process"
        ):
            remove_images(index_dir, ids=[1])
        with pytest.raises(IndexLockedError, match="one writer at a time"):
            add_images(source, index_dir, device="cpu")
    assert committed_state(index_dir) == before
    assert remove_images(index_dir, ids=[1]).committed  # released: the next writer goes ahead


def test_bad_input_changes_nothing(living, tmp_path, other_clip):
    source, index_dir = living
    before = committed_state(index_dir)
    with pytest.raises(SourceError, match=r"SOURCE .*missing does not exist"):
        add_images(tmp_path / "missing", index_dir, device="cpu")
    write_images(source / "new", 1, seed=48)
    with pytest.raises(ModelMismatchError, match=r"built with model .*tiny-clip.*other-clip"):
        add_images(source, index_dir, model=other_clip, device="cpu")
    with pytest.raises(IndexNotFoundError, match="no committed index in"):
        add_images(source, tmp_path / "nothing.idx", device="cpu")
    with pytest.raises(IndexNotFoundError, match="no committed index in"):
        remove_images(tmp_path / "nothing.idx", ids=[1])
    assert not (tmp_path / "nothing.idx").exists()
    assert committed_state(index_dir) == before

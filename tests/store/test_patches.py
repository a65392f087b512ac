from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store import PatchStore, PatchWriter, StoreConfig, read_generation_info


def test_shards_fill_one_after_another(written) -> None:
    info = read_generation_info(written.root / "gen-000001")
    # 23 rows appended in batches of 7, 1, 0, 15 with 5 rows per shard.
    assert [(s.file, s.rows) for s in info.patch_shards] == [
        ("patches-000.npy", 5),
        ("patches-001.npy", 5),
        ("patches-002.npy", 5),
        ("patches-003.npy", 5),
        ("patches-004.npy", 3),
    ]
    shard = np.load(written.root / "gen-000001" / "patches-001.npy")
    assert shard.dtype == np.float16 and shard.shape == (5, 3, 4)
    np.testing.assert_array_equal(shard, written.patches[5:10].astype(np.float16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_equals_fancy_indexing_across_shards(written, seed: int) -> None:
    store = PatchStore.open(written.root / "gen-000001")
    assert len(store) == 23 and store.shape == (3, 4) and store.n_shards == 5
    full = written.patches.astype(np.float16)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 23, size=40)  # random order, repeats, every shard
    got = store.gather(rows)
    assert got.dtype == np.float16 and got.shape == (40, 3, 4)
    np.testing.assert_array_equal(got, full[rows])
    # within one shard (the single-take path), unsorted
    np.testing.assert_array_equal(store.gather(np.array([9, 5, 7, 5])), full[[9, 5, 7, 5]])
    # the last rows and the boundaries
    edges = np.array([22, 0, 4, 5, 19, 20, 14, 15])
    np.testing.assert_array_equal(store.gather(edges), full[edges])
    np.testing.assert_array_equal(store.gather(np.arange(23)), full)


@pytest.mark.parametrize("shape", [(3, 4), (8, 1024)], ids=["small_rows", "large_rows"])
def test_gather_paths_agree_with_fancy_indexing(tmp_path: Path, make_generation, shape) -> None:
    # Small rows take the vectorised path across shards, rows of 16 KiB and more the per-row one.
    n_patches, patch_dim = shape
    written = make_generation(tmp_path / "idx", n=12, n_patches=n_patches, patch_dim=patch_dim)
    store = PatchStore.open(written.root / "gen-000001")
    assert store.n_shards == 3
    full = written.patches.astype(np.float16)
    rows = np.random.default_rng(5).integers(0, 12, size=30)
    np.testing.assert_array_equal(store.gather(rows), full[rows])
    np.testing.assert_array_equal(store.gather(rows[::-1]), full[rows[::-1]])


def test_gather_accepts_lists_and_empty(written) -> None:
    store = PatchStore.open(written.root / "gen-000001")
    expected = written.patches[[3, 21]].astype(np.float16)
    np.testing.assert_array_equal(store.gather([3, 21]), expected)
    assert store.gather([]).shape == (0, 3, 4)
    assert store.gather(np.array([4], np.uint32)).shape == (1, 3, 4)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.array([0, 23]), r"row 23 is out of range for a patch store of 23 rows \(valid 0..22\)"),
        (np.array([-1, 3]), r"row -1 is out of range for a patch store of 23 rows"),
        (np.array([0.0, 1.0]), "rows must be integers, got dtype float64"),
        (np.array([[0, 1]]), r"rows must be a 1-d integer array, got shape \(1, 2\)"),
    ],
)
def test_gather_rejects_bad_rows(written, rows: np.ndarray, message: str) -> None:
    store = PatchStore.open(written.root / "gen-000001")
    with pytest.raises(InvalidArgumentError, match=message):
        store.gather(rows)


def test_writer_rejects_bad_batches(tmp_path: Path) -> None:
    writer = PatchWriter(tmp_path, config=StoreConfig(patch_shard_rows=2))
    writer.append(np.ones((3, 2, 4), np.float32))
    message = r"patches have \(n_patches, dim\) \(2, 5\), but earlier batches had \(2, 4\)"
    with pytest.raises(InvalidArgumentError, match=message):
        writer.append(np.ones((1, 2, 5), np.float32))
    message = r"must be a float array of shape \(b, n_patches, dim\), got int64"
    with pytest.raises(InvalidArgumentError, match=message):
        writer.append(np.ones((1, 2, 4), np.int64))
    overflow = np.full((2, 2, 4), 1e5, np.float32)  # beyond float16's 65504
    with pytest.raises(InvalidArgumentError, match="not finite in float16"):
        writer.append(overflow)
    assert writer.rows == 3  # the rejected batches wrote nothing
    shards = writer.close()
    assert [(s.file, s.rows) for s in shards] == [("patches-000.npy", 2), ("patches-001.npy", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches-000.npy", "patches-001.npy"]
    with pytest.raises(InvalidArgumentError, match="patch writer is closed"):
        writer.append(np.ones((1, 2, 4), np.float32))


def test_shard_rows_follow_the_byte_budget(tmp_path: Path) -> None:
    # 3 x 4 float16 = 24 bytes per row: a 100-byte budget holds 4 rows per shard.
    writer = PatchWriter(tmp_path, config=StoreConfig(patch_shard_bytes=100))
    writer.append(np.ones((10, 3, 4), np.float32))
    assert [s.rows for s in writer.close()] == [4, 4, 2]
    assert all((tmp_path / f"patches-00{i}.npy").stat().st_size <= 128 + 100 for i in range(3))


def test_open_rejects_a_shard_of_the_wrong_shape(written) -> None:
    gen_dir = written.root / "gen-000001"
    np.save(gen_dir / "patches-004.npy", np.zeros((2, 3, 4), np.float16))
    message = r"patches-004.npy holds float16 \(2, 3, 4\), generation.json records float16 \(3, "
    with pytest.raises(IndexCorruptError, match=message):
        PatchStore.open(gen_dir)


def test_large_patch_files_get_a_read_ahead_hint_per_gathered_row(
    written, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import crossrank.store.patches as patches

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    hinted: list[tuple[str, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        hinted.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(patches, "_HINT_MIN_BYTES", 0)  # every shard counts as large
    gen = written.root / "gen-000001"
    store = PatchStore.open(gen)
    rows = np.array([7, 0, 22, 9])  # shards 1, 0, 4, 1
    np.testing.assert_array_equal(store.gather(rows), written.patches.astype(np.float16)[rows])
    row_bytes = 3 * 4 * 2
    header = {f: int(np.load(gen / f, mmap_mode="r").offset) for f in ("patches-000.npy",)}
    want = {("patches-000.npy", 0), ("patches-001.npy", 2), ("patches-001.npy", 4)}
    want |= {("patches-004.npy", 2)}
    assert {(Path(p).name, (o - header["patches-000.npy"]) // row_bytes) for p, o, _ in hinted} == (
        want
    )
    assert all(length == row_bytes for _, _, length in hinted)
    hinted.clear()
    monkeypatch.setattr(patches, "_HINT_MIN_BYTES", 1 << 40)  # small files: no hint
    store.gather(rows)
    assert hinted == []

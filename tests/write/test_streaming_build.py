"""The streaming build: chunks written as they fill give the index a build in one piece gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from crossrank import Index
from crossrank.store import Generation
from crossrank.store.layout import STAGING_JOURNAL_NAME, STAGING_NAME
from crossrank.write.build import build_index

from ..conftest import write_images


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """22 images, an undecodable file, and a byte-identical copy of an early image placed late."""
    root = tmp_path_factory.mktemp("stream") / "photos"
    paths = write_images(root, 14, seed=40)
    write_images(root / "z-late", 8, seed=41)
    shutil.copyfile(paths[1], root / "z-late" / "copy-of-1.png")
    (root / "m-broken.png").write_bytes(b"not an image")
    return root


def _build(source: Path, out: Path, model: Path, chunk_items: int, **kw):
    return build_index(
        source,
        out,
        model=model,
        device="cpu",
        batch_size=2,
        workers=1,
        chunk_items=chunk_items,
        **kw,
    )


def assert_same_index(a: Path, b: Path) -> None:
    """Same ids, vectors, decoded patches, metadata, skipped files and search results."""
    ga, gb = Generation.current(a), Generation.current(b)
    assert np.array_equal(ga.ids(), gb.ids())
    assert np.array_equal(np.asarray(ga.vectors()), np.asarray(gb.vectors()))
    rows = np.arange(len(ga.ids()))
    assert np.array_equal(ga.patches().gather(rows), gb.patches().gather(rows))
    with ga.metadata() as ma, gb.metadata() as mb:
        assert ma.table().equals(mb.table())
    for name in ("skipped.parquet", "ids.npy", "vectors.npy", "first_stage.faiss"):
        assert (ga.path / name).read_bytes() == (gb.path / name).read_bytes(), name
    with Index.open(a, device="cpu") as ia, Index.open(b, device="cpu") as ib:
        xq = np.asarray(ga.vectors())[:5]
        ra, rb = ia.search_vectors(xq, k=5), ib.search_vectors(xq, k=5)
        assert [[h.id for h in r] for r in ra] == [[h.id for h in r] for r in rb]


def test_many_chunks_give_the_index_of_one(source, tmp_path, tiny_clip):
    one = _build(source, tmp_path / "one.idx", tiny_clip, 1 << 20)
    many = _build(source, tmp_path / "many.idx", tiny_clip, 4)
    assert (
        (many.indexed, many.skipped, many.duplicates)
        == (one.indexed, one.skipped, 1)
        == (
            22,
            2,
            1,
        )
    )
    assert_same_index(tmp_path / "one.idx", tmp_path / "many.idx")
    info = Generation.current(tmp_path / "many.idx").info
    assert len(info.patch_shards) > 4 and len(info.metadata_parts) == len(info.patch_shards)
    # the duplicate, found in a later chunk than its original, names the original
    skipped = pq.read_table(Generation.current(tmp_path / "many.idx").path / "skipped.parquet")
    assert {
        "path": str(source / "z-late" / "copy-of-1.png"),
        "reason": "duplicate of " + str(source / "img_001.png"),
    } in skipped.to_pylist()
    assert not (tmp_path / "many.idx" / STAGING_NAME).exists()  # the commit removed the staging


def test_vectors_are_the_encoders(source, tmp_path, tiny_clip, tiny_encoder):
    """Each stored row is the encoder's features of that image (the build loses nothing)."""
    from PIL import Image

    _build(source, tmp_path / "s.idx", tiny_clip, 4)
    gen = Generation.current(tmp_path / "s.idx")
    with gen.metadata() as meta:
        paths = meta.table(columns=["path"]).column("path").to_pylist()
    images = [Image.open(p).convert("RGB") for p in paths[:6]]
    features = tiny_encoder.encode_images(images)
    assert np.allclose(np.asarray(gen.vectors())[:6], features.pooled, atol=1e-5)
    assert np.allclose(
        gen.patches().gather(np.arange(6)).astype(np.float32),
        np.asarray(features.patches, np.float16).astype(np.float32),
        atol=2e-3,
    )


def test_chunks_reach_the_disk_while_the_build_runs(source, tmp_path, tiny_clip):
    """Vectors, patches and metadata of a finished chunk are on disk (journaled) before the end."""
    seen: list[tuple[int, int, list[str]]] = []
    staging = tmp_path / "s.idx" / STAGING_NAME

    def progress(done: int, total: int) -> None:
        journal = staging / STAGING_JOURNAL_NAME
        lines = journal.read_text().splitlines() if journal.exists() else []
        seen.append((done, len(lines), sorted(p.name for p in staging.iterdir())))

    _build(source, tmp_path / "s.idx", tiny_clip, 4, progress=progress)
    at_8 = next(entry for entry in seen if entry[0] == 8)
    assert at_8[1] == 2  # two chunks of 4 files journaled
    assert {"vectors-000001.npy", "patches-001.npy", "metadata-001.parquet"} <= set(at_8[2])


def test_pq_streamed_trains_the_same_quantiser(source, tmp_path, tiny_clip):
    """pq trains once, at the end, on the seeded sample a build in one piece draws."""
    one = _build(source, tmp_path / "one.idx", tiny_clip, 1 << 20, patch_codec="pq:4x3")
    many = _build(source, tmp_path / "many.idx", tiny_clip, 4, patch_codec="pq:4x3")
    assert one.patch_codec == many.patch_codec == "pq:4x3"
    ga, gb = Generation.current(tmp_path / "one.idx"), Generation.current(tmp_path / "many.idx")
    assert (ga.path / "patch_codec.faiss").read_bytes() == (
        gb.path / "patch_codec.faiss"
    ).read_bytes()
    assert_same_index(tmp_path / "one.idx", tmp_path / "many.idx")


def test_int8_chunks_are_linked_as_shards(source, tmp_path, tiny_clip):
    _build(source, tmp_path / "one.idx", tiny_clip, 1 << 20, patch_codec="int8")
    _build(source, tmp_path / "many.idx", tiny_clip, 6, patch_codec="int8")
    assert_same_index(tmp_path / "one.idx", tmp_path / "many.idx")

"""Tiny generations written straight through the store API (no encoder, no FAISS)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crossrank.store import GenerationWriter, StoreConfig


@dataclass
class Written:
    """What a test generation holds, to compare against what the store reads back."""

    root: Path
    generation: int
    ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32
    patches: np.ndarray  # (n, P, d) float32
    metadata: pa.Table
    skipped: pa.Table


def make_metadata(ids: np.ndarray, seed: int = 0) -> pa.Table:
    """Metadata with the contract's columns plus two manifest columns (one with nulls)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    labels = ["cat", "dog", "bird", None]
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": [f"/data/{'cats' if i % 3 == 0 else 'misc'}/img_{i:04d}.jpg" for i in ids],
            "sha256": [f"{i:064x}" for i in ids],
            "width": pa.array(rng.integers(16, 400, n), pa.int32()),
            "height": pa.array(rng.integers(16, 400, n), pa.int32()),
            "bytes": pa.array(rng.integers(100, 10_000, n), pa.int64()),
            "mtime": pa.array(
                [dt.datetime(2024, 1, 1) + dt.timedelta(days=int(i)) for i in ids],
                pa.timestamp("us"),
            ),
            "label": [labels[k % 4] for k in range(n)],
            "score": pa.array(rng.random(n), pa.float64()),
        }
    )


def write_generation(
    root: Path,
    *,
    n: int = 23,
    n_patches: int = 3,
    patch_dim: int = 4,
    dim: int = 5,
    seed: int = 0,
    batch_sizes: tuple[int, ...] | None = None,
    config: StoreConfig | None = None,
    n_skipped: int = 2,
) -> Written:
    """Write and commit one generation of ``n`` images, patches appended in uneven batches."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64) * 2 + seed  # sorted, but not 0..n-1: catches id/row mix-ups
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    patches = rng.standard_normal((n, n_patches, patch_dim)).astype(np.float32)
    metadata = make_metadata(ids, seed)
    skipped = pa.table(
        {
            "path": [f"/data/bad_{i}.png" for i in range(n_skipped)],
            "reason": ["truncated"] * n_skipped,
        }
    )
    config = config or StoreConfig(
        patch_shard_rows=5, metadata_part_rows=10, metadata_row_group_rows=4
    )
    batch_sizes = batch_sizes or (7, 1, 0, n - 8)
    with GenerationWriter(root, config=config) as w:
        start = 0
        for b in batch_sizes:
            w.patches.append(patches[start : start + b])
            w.write_metadata(metadata.slice(start, b))
            start += b
        assert start == n
        w.write_vectors(vectors)
        w.write_ids(ids)
        w.write_skipped(skipped)
        w.first_stage_path.write_bytes(b"faiss-placeholder-" + str(seed).encode())
        generation = w.commit(
            {
                "encoder": {"model_id": "tiny", "dim": dim},
                "first_stage": {"factory": "Flat"},
                "note": "x",
            }
        )
    return Written(root, generation, ids, vectors, patches, metadata, skipped)


@pytest.fixture
def written(tmp_path: Path) -> Written:
    """One committed generation in ``tmp_path / "idx"``."""
    return write_generation(tmp_path / "idx")


@pytest.fixture
def make_generation():
    """``write_generation`` as a fixture, for tests that write several generations."""
    return write_generation

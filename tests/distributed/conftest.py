"""Fixtures of the Ray tests: one local Ray cluster of 2 CPUs for this folder, a shapes source."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: Shapes images in the source: enough for several encoder batches and decode blocks.
N_IMAGES = 60
BATCH = 16


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[Any]:
    """A real local Ray cluster with 2 worker CPUs, started once for the tests of this folder
    (its start costs seconds) and stopped after them."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'crossrank[ray]'")
    pytest.importorskip(
        "ray.data", reason="Ray Data is not installed: pip install 'crossrank[ray]'"
    )
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet manifest of 60 shapes images, a file that is not an image and a byte-identical
    copy of one image, with a column of its own (``label``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossrank.datasets.shapes import generate_shapes

    root = tmp_path_factory.mktemp("ray-shapes")
    ds = generate_shapes(root / "shapes", n_images=N_IMAGES, n_queries=0, seed=3, workers=1)
    images = sorted(ds.images_dir.glob("*.png"))
    (ds.images_dir / "broken.png").write_bytes(b"this is not a png")
    shutil.copy(images[7], ds.images_dir / "zz-copy.png")
    paths = sorted(str(p) for p in ds.images_dir.iterdir())
    manifest = root / "manifest.parquet"
    labels = pa.array([f"label-{i % 5}" for i in range(len(paths))], type=pa.string())
    pq.write_table(pa.table({"path": paths, "label": labels}), manifest)
    return manifest


@pytest.fixture(scope="session")
def local_build(tmp_path_factory: pytest.TempPathFactory, shapes_manifest: Path) -> Path:
    """The one-process build of ``shapes_manifest``: the reference. Tests must not modify it."""
    from crossrank.write import build_index

    path = tmp_path_factory.mktemp("ray-ref") / "local.idx"
    build_index(shapes_manifest, path, device="cpu", batch_size=BATCH, workers=2)
    return path


def index_contents(index_dir: Path) -> dict[str, Any]:
    """Everything a build decides, read back from the committed generation."""
    import pyarrow.parquet as pq

    from crossrank.store import Generation, read_manifest
    from crossrank.store.metadata import read_skipped

    gen = Generation.current(index_dir)
    manifest = read_manifest(index_dir)
    return {
        "ids": np.asarray(gen.ids()),
        "vectors": np.asarray(gen.vectors()),
        "patches": gen.patches().gather(np.arange(len(gen))).astype(np.float32),
        "metadata": pq.read_table(sorted(gen.path.glob("metadata-*.parquet"))).sort_by("id"),
        "skipped": read_skipped(gen.path / "skipped.parquet"),
        "counts": dict(manifest.counts),
        "encoder": dict(manifest.encoder),
    }

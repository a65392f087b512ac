"""Writes a shapes benchmark corpus to a folder: images, scene metadata, queries, qrels, pairs.

Layout of ``DIR``::

    images/000000.png ...   RGB PNG, image_size x image_size
    metadata.parquet        one row per image: path ("images/000123.png"), split, width, height,
                            n_objects, colours, shapes, sizes, rows, cols (parallel lists, one entry
                            per object, sorted by (row, col)), has_heldout, objects (JSON)
    queries.parquet         query_id ("q00012"), text, kind (single|pair|relation), heldout,
                            n_relevant
    qrels.txt               TREC qrels "q00012 0 images/000123.png 1", every relevant image
    pairs.parquet           training pairs: path, caption, kind, heldout, spec (JSON of QuerySpec)
    dataset.json            the config, counts, held-out pairs and palette

Determinism: image ``i`` is drawn from its own generator seeded by ``(seed, split, i)``, so the
files do not depend on how the work is split between processes; the same seed and split give
byte-identical files. The test and train splits use different streams: the training corpus for a
test corpus made with ``--seed S`` is ``crossrank dataset shapes --split train --seed S ...``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from crossrank.datasets.config import HELDOUT_PAIRS, PALETTE, ShapesConfig, Split
from crossrank.datasets.language import QuerySpec
from crossrank.datasets.relevance import SceneArrays, match_matrix
from crossrank.datasets.render import render_scene
from crossrank.datasets.sampling import sample_captions, sample_queries
from crossrank.datasets.scene import Scene, sample_scene
from crossrank.errors import InvalidArgumentError, some_of

__all__ = [
    "ShapesDataset",
    "generate_shapes",
    "generate_from_config",
    "open_shapes",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SPLIT_STREAM = {Split.TEST: 0, Split.TRAIN: 1}
_IMAGE_STREAM, _QUERY_STREAM = 0, 1
_OUTPUTS = ("metadata.parquet", "queries.parquet", "qrels.txt", "pairs.parquet", "dataset.json")
_CHUNK = 250  # images per work item
_GENERATED_IMAGE = re.compile(r"\d{6,}\.png")  # the names _image_name gives


@dataclass(frozen=True)
class ShapesDataset:
    """A generated corpus on disk (what :func:`generate_shapes` returns)."""

    root: Path
    config: ShapesConfig
    n_images: int
    n_queries: int
    n_heldout_queries: int
    n_pairs: int

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def metadata_path(self) -> Path:
        return self.root / "metadata.parquet"

    @property
    def queries_path(self) -> Path:
        return self.root / "queries.parquet"

    @property
    def qrels_path(self) -> Path:
        return self.root / "qrels.txt"

    @property
    def pairs_path(self) -> Path:
        return self.root / "pairs.parquet"

    @property
    def info_path(self) -> Path:
        return self.root / "dataset.json"

    def scenes(self) -> list[Scene]:
        """The scene graph of every image, in ``metadata.parquet`` row order."""
        import pyarrow.parquet as pq

        objects = pq.read_table(self.metadata_path, columns=["objects"]).column("objects")
        return [Scene.from_json(s) for s in objects.to_pylist()]

    def scene_arrays(self) -> SceneArrays:
        """The scenes encoded for :func:`~crossrank.datasets.relevance.match_matrix`."""
        import pyarrow.parquet as pq

        return SceneArrays.from_table(pq.read_table(self.metadata_path))


def open_shapes(root: str | os.PathLike) -> ShapesDataset:
    """Opens a corpus written by :func:`generate_shapes`.

    Raises:
        InvalidArgumentError: when ``root`` holds no ``dataset.json``.
    """
    root = Path(root)
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise InvalidArgumentError(
            f"{root} is not a shapes dataset (no dataset.json); "
            "make one with `crossrank dataset shapes`"
        )
    info = json.loads(info_path.read_text())
    counts = info["counts"]
    return ShapesDataset(
        root=root,
        config=ShapesConfig(**info["config"]),
        n_images=counts["images"],
        n_queries=counts["queries"],
        n_heldout_queries=counts["heldout_queries"],
        n_pairs=counts["pairs"],
    )


def _image_name(i: int, n: int) -> str:
    return f"images/{i:0{max(6, len(str(n - 1)))}d}.png"


def _render_chunk(
    root: str, config: ShapesConfig, lo: int, hi: int
) -> list[tuple[str, list[QuerySpec]]]:
    """Renders images ``lo..hi-1``; returns (scene JSON, captions) per image."""
    out = []
    split_stream = _SPLIT_STREAM[config.split]
    include_heldout = config.split is Split.TEST
    for i in range(lo, hi):
        rng = np.random.default_rng([config.seed, split_stream, _IMAGE_STREAM, i])
        scene = sample_scene(rng, config.image_size, include_heldout)
        img = render_scene(scene, config.image_size, rng)
        path = os.path.join(root, _image_name(i, config.n_images))
        img.save(path, format="PNG", compress_level=1)
        captions = sample_captions(
            scene, rng, k=config.captions_per_image, size_word_prob=config.size_word_prob
        )
        out.append((scene.to_json(), captions))
    return out


def _remove_outputs(root: Path) -> None:
    shutil.rmtree(root / "images", ignore_errors=True)
    for name in _OUTPUTS:
        (root / name).unlink(missing_ok=True)


def _prepare_dir(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise InvalidArgumentError(f"output dir {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise InvalidArgumentError(
                f"output dir {root} is not empty; "
                "choose another dir or pass overwrite=True (--overwrite)"
            )
        _refuse_foreign_images(root)
        _remove_outputs(root)
    (root / "images").mkdir(parents=True, exist_ok=True)


def _refuse_foreign_images(root: Path) -> None:
    """Refuse to overwrite when ``images/`` holds anything the generator does not write there.

    ``overwrite`` removes ``images/`` whole: in a folder of the user's (photos in ``images/``) it
    would delete their files.
    """
    images = root / "images"
    if not images.exists():
        return
    if not images.is_dir():
        foreign = ["images (a file)"]
    else:
        foreign = sorted(
            e.name
            for e in images.iterdir()
            if not (e.is_file() and _GENERATED_IMAGE.fullmatch(e.name))
        )
    if foreign:
        shown = some_of(foreign)
        raise InvalidArgumentError(
            f"output dir {root} has an images/ folder holding files the generator did not write "
            f"({shown}); overwrite would delete them, so it is refused: choose another dir"
        )


def generate_shapes(
    out_dir: str | os.PathLike,
    *,
    n_images: int,
    n_queries: int,
    seed: int = 0,
    split: Split | str = Split.TEST,
    image_size: int = 64,
    captions_per_image: int = 6,
    workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ShapesDataset:
    """Generates a shapes corpus (see the module docstring for the files).

    Args:
        out_dir: the folder to write; created if missing, must be empty unless ``overwrite``.
        n_images: images, >= 1.
        n_queries: evaluation queries, >= 0; a third of each kind, each with >= 1 relevant image.
        seed: the same seed and split give byte-identical files.
        split: "test" (all colour-shape pairs, held-out queries flagged) or "train" (no held-out
            pair in any image, caption or query; a random stream disjoint from the test one).
        image_size: px, 64 to 96.
        captions_per_image: true captions per image written to pairs.parquet.
        workers: rendering processes; 0 = auto. The files do not depend on it.
        overwrite: replace the outputs of an earlier run in ``out_dir``.
        progress: called as ``progress(images_done, n_images)`` while rendering.

    Returns:
        The :class:`ShapesDataset` written.

    Raises:
        InvalidArgumentError: for a bad count, size or split, a non-empty ``out_dir`` without
            ``overwrite``, or more queries than the images allow.

    Example:
        >>> ds = generate_shapes("shapes-test", n_images=2000, n_queries=300, seed=0)
        >>> train = generate_shapes("shapes-train", n_images=20000, n_queries=0, split="train")
    """
    config = ShapesConfig(
        n_images=n_images,
        n_queries=n_queries,
        seed=seed,
        split=split,
        image_size=image_size,
        captions_per_image=captions_per_image,
    )
    return generate_from_config(
        out_dir, config, workers=workers, overwrite=overwrite, progress=progress
    )


def generate_from_config(
    out_dir: str | os.PathLike,
    config: ShapesConfig,
    *,
    workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ShapesDataset:
    """:func:`generate_shapes` with a ready :class:`ShapesConfig`.

    ``workers`` (rendering processes; 0 = auto: 1 below 4,000 images, else up to 2) never changes
    the files written.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InvalidArgumentError(f"workers must be an integer >= 0 (0 = auto), got {workers!r}")
    root = Path(out_dir)
    _prepare_dir(root, overwrite)
    n = config.n_images
    bounds = [(lo, min(n, lo + _CHUNK)) for lo in range(0, n, _CHUNK)]
    workers = workers or (1 if n < 4000 else min(2, os.cpu_count() or 1))
    results: list[tuple[str, list[QuerySpec]]] = []
    if workers == 1 or len(bounds) == 1:
        for lo, hi in bounds:
            results.extend(_render_chunk(str(root), config, lo, hi))
            if progress is not None:
                progress(hi, n)
    else:
        # spawn, not fork: the caller may hold torch / faiss thread pools, which fork can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_render_chunk, str(root), config, lo, hi) for lo, hi in bounds]
            for fut, (_, hi) in zip(futures, bounds, strict=True):
                results.extend(fut.result())
                if progress is not None:
                    progress(hi, n)
    scenes = [Scene.from_json(s) for s, _ in results]
    paths = [_image_name(i, n) for i in range(n)]

    qrng = np.random.default_rng([config.seed, _SPLIT_STREAM[config.split], _QUERY_STREAM])
    try:
        queries = sample_queries(
            scenes,
            qrng,
            n_queries=config.n_queries,
            heldout_fraction=config.heldout_query_fraction if config.split is Split.TEST else 0.0,
            size_word_prob=config.size_word_prob,
        )
    except InvalidArgumentError:
        _remove_outputs(root)  # leave no half-written corpus behind
        raise
    relevant = match_matrix(queries, scenes)  # (n_queries, n_images)
    if queries and not relevant.any(axis=1).all():  # sampled from scenes: cannot happen
        raise RuntimeError("internal error: a sampled query has no relevant image")

    _write_metadata(root, config, paths, scenes, [s for s, _ in results])
    width = max(5, len(str(max(len(queries) - 1, 0))))
    qids = [f"q{i:0{width}d}" for i in range(len(queries))]
    _write_queries(root, qids, queries, relevant)
    _write_qrels(root, qids, paths, relevant)
    n_pairs = _write_pairs(root, paths, [c for _, c in results])
    n_heldout = sum(q.heldout for q in queries)
    info = {
        "name": "shapes",
        "format_version": FORMAT_VERSION,
        "config": {k: (v.value if isinstance(v, Split) else v) for k, v in asdict(config).items()},
        "counts": {
            "images": n,
            "queries": len(queries),
            "heldout_queries": n_heldout,
            "pairs": n_pairs,
            "queries_by_kind": {
                k: sum(q.kind.value == k for q in queries) for k in ("single", "pair", "relation")
            },
        },
        "heldout_pairs": sorted(f"{c.value} {s.value}" for c, s in HELDOUT_PAIRS),
        "palette": {c.value: list(rgb) for c, rgb in PALETTE.items()},
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d images, %d queries, %d pairs to %s", n, len(queries), n_pairs, root)
    return ShapesDataset(
        root=root,
        config=config,
        n_images=n,
        n_queries=len(queries),
        n_heldout_queries=n_heldout,
        n_pairs=n_pairs,
    )


def _write_metadata(
    root: Path, config: ShapesConfig, paths: list[str], scenes: list[Scene], objects_json: list[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lists(fn, typ):
        return pa.array([[fn(o) for o in s.objects] for s in scenes], type=pa.list_(typ))

    n = len(paths)
    table = pa.table(
        {
            "path": pa.array(paths, type=pa.string()),
            "split": pa.array([config.split.value] * n, type=pa.string()),
            "width": pa.array([config.image_size] * n, type=pa.int32()),
            "height": pa.array([config.image_size] * n, type=pa.int32()),
            "n_objects": pa.array([len(s.objects) for s in scenes], type=pa.int8()),
            "colours": lists(lambda o: o.colour.value, pa.string()),
            "shapes": lists(lambda o: o.shape.value, pa.string()),
            "sizes": lists(lambda o: o.size.value, pa.string()),
            "rows": lists(lambda o: o.row, pa.int8()),
            "cols": lists(lambda o: o.col, pa.int8()),
            "has_heldout": pa.array([s.heldout for s in scenes], type=pa.bool_()),
            "objects": pa.array(objects_json, type=pa.string()),
        }
    )
    pq.write_table(table, root / "metadata.parquet")


def _write_queries(
    root: Path, qids: list[str], queries: list[QuerySpec], relevant: np.ndarray
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "query_id": pa.array(qids, type=pa.string()),
            "text": pa.array([q.text for q in queries], type=pa.string()),
            "kind": pa.array([q.kind.value for q in queries], type=pa.string()),
            "heldout": pa.array([q.heldout for q in queries], type=pa.bool_()),
            "n_relevant": pa.array(relevant.sum(axis=1).astype(np.int32), type=pa.int32()),
        }
    )
    pq.write_table(table, root / "queries.parquet")


def _write_qrels(root: Path, qids: list[str], paths: list[str], relevant: np.ndarray) -> None:
    lines = []
    for qid, row in zip(qids, relevant, strict=True):
        lines.extend(f"{qid} 0 {paths[j]} 1\n" for j in np.flatnonzero(row))
    (root / "qrels.txt").write_text("".join(lines))


def _write_pairs(root: Path, paths: list[str], captions: list[list[QuerySpec]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_path, rows_caption, rows_kind, rows_heldout, rows_spec = [], [], [], [], []
    for path, caps in zip(paths, captions, strict=True):
        for spec in caps:
            rows_path.append(path)
            rows_caption.append(spec.text)
            rows_kind.append(spec.kind.value)
            rows_heldout.append(spec.heldout)
            rows_spec.append(json.dumps(spec.to_dict(), separators=(",", ":")))
    table = pa.table(
        {
            "path": pa.array(rows_path, type=pa.string()),
            "caption": pa.array(rows_caption, type=pa.string()),
            "kind": pa.array(rows_kind, type=pa.string()),
            "heldout": pa.array(rows_heldout, type=pa.bool_()),
            "spec": pa.array(rows_spec, type=pa.string()),
        }
    )
    pq.write_table(table, root / "pairs.parquet")
    return table.num_rows

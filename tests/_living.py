"""Helpers of the living-index tests: writer processes, and what a sound index must satisfy.

Writer processes are forked by a ``forkserver`` that has imported torch, transformers and
crossrank once (a few seconds), so each crash case costs a fork and the work itself, not a fresh
interpreter. The forkserver is a fresh process that ran nothing, so forking it is safe (no
threads, no OpenMP pool in the parent).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_PRELOAD = [
    "crossrank.cli",
    "crossrank.write",
    "crossrank.write.build",
    "crossrank.api.index",
    "crossrank.encoders",
    "torch",
    "transformers",
    "faiss",
    "duckdb",
    "pyarrow.parquet",
]
_context: Any = None


def writer_context() -> Any:
    """The multiprocessing context whose processes run the writers (forked from a warm server)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def run_cli(argv: list[str], crash_at: str | None = None) -> None:
    """Process target: ``crossrank *argv``, killed by SIGKILL at ``crash_at`` when it gets there."""
    if crash_at is not None:
        os.environ["CROSSRANK_CRASH_AT"] = crash_at
    else:
        os.environ.pop("CROSSRANK_CRASH_AT", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sys.argv = ["crossrank", *argv]
    import torch

    torch.set_num_threads(1)
    from crossrank.cli import main

    main()


def run_in_process(
    argv: list[str], crash_at: str | None = None, timeout: float = 120
) -> int | None:
    """Run :func:`run_cli` in a writer process; returns its exit code (-9: killed by SIGKILL)."""
    ctx = writer_context()
    proc = ctx.Process(target=run_cli, args=(argv, crash_at))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():  # a hang is a failure, never a stuck test run
        proc.kill()
        proc.join()
        raise AssertionError(
            f"crossrank {' '.join(argv)} (crash at {crash_at}) did not finish in {timeout} s"
        )
    return proc.exitcode


def build_living(root: Path, model: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``root/photos`` with ``n`` random images (``seed``) and ``root/photos.idx`` built over it."""
    from crossrank.write.build import build_index

    from .conftest import write_images

    source = root / "photos"
    write_images(source, n, seed=seed)
    index_dir = root / "photos.idx"
    build_index(source, index_dir, model=model, device="cpu", batch_size=8, workers=1)
    return source, index_dir


def private_copy(index_dir: Path, folder: Path) -> Path:
    """A copy of ``index_dir`` as ``folder/photos.idx``, without the readers' pin files."""
    import shutil

    return Path(
        shutil.copytree(index_dir, folder / "photos.idx", ignore=shutil.ignore_patterns("*.pin"))
    )


@dataclass(frozen=True)
class State:
    """What an index holds, as a reader sees it: generation and ``{id: path}`` of live images."""

    generation: int
    images: dict[int, str]


def index_state(index_dir: Path) -> State | None:
    """The committed state of ``index_dir``; None when nothing is committed there."""
    from crossrank.errors import IndexNotFoundError
    from crossrank.store import Generation, read_manifest

    try:
        manifest = read_manifest(index_dir)
    except IndexNotFoundError:
        return None
    gen = Generation(manifest.generation_path)
    live = set(gen.live_ids().tolist())
    with gen.metadata() as meta:
        table = meta.table(columns=["id", "path"])
    return State(
        manifest.generation,
        {
            i: p
            for i, p in zip(
                table.column("id").to_pylist(), table.column("path").to_pylist(), strict=True
            )
            if i in live
        },
    )


def assert_sound(index_dir: Path) -> State:
    """The checks after every crash: the index opens, verify passes, every image is found.

    Every live image is searched by its own stored vector and must come first (the test images
    are distinct, so an image is its own unique nearest neighbour); the metadata holds one row
    per live image, with distinct paths and contents. Returns the state.
    """
    from crossrank import Index
    from crossrank.api.verify import verify_index

    assert verify_index(index_dir) == [], verify_index(index_dir)
    state = index_state(index_dir)
    assert state is not None
    with Index.open(index_dir, device="cpu") as index:
        assert index.generation == state.generation
        live = np.array(sorted(state.images), dtype=np.int64)
        assert len(index) == live.size
        gen = index.stored
        xq = (
            np.asarray(gen.vectors()[gen.rows_of_ids(live)])
            if live.size
            else np.zeros((0, index.first_stage.d))
        )
        if live.size:
            results = index.search_vectors(xq, k=min(3, live.size))
            assert [r[0].id for r in results] == live.tolist()
            assert {r[0].id: r[0].path for r in results} == state.images
            assert all(r.generation == state.generation for r in results)
        meta = index.metadata(columns=["id", "path", "sha256"])
        assert meta.column("id").to_pylist() == live.tolist()
        assert len(set(meta.column("path").to_pylist())) == live.size  # no image twice
        assert len(set(meta.column("sha256").to_pylist())) == live.size
    return state


def write_log(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the writer process's record of what it committed)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def writer_loop(
    index_dir: str, source: str, log: str, rounds: int, seconds: float, seed: int
) -> None:
    """Process target of the concurrency test: add two new images, remove one, ``rounds`` times
    (and compact every third round), within ``seconds``.

    After each commit it logs the committed generation with its live ``{id: path}``, which the
    readers' results are checked against.
    """
    import time

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    from crossrank.encoders import load_encoder
    from crossrank.store import read_manifest
    from crossrank.write import add_images, compact_index, remove_images

    from .conftest import write_images

    manifest = read_manifest(index_dir)
    encoder = load_encoder(manifest.encoder["model_id"], device="cpu")
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + seconds
    for r in range(rounds):
        if time.monotonic() > deadline:
            break
        write_images(Path(source) / f"round-{r:02d}", 2, seed=1000 + r)
        add_images(source, index_dir, encoder=encoder, device="cpu", workers=1)
        state = index_state(Path(index_dir))
        write_log(Path(log), {"generation": state.generation, "images": state.images})
        victim = int(rng.choice(sorted(state.images)))
        remove_images(index_dir, ids=[victim])
        state = index_state(Path(index_dir))
        write_log(Path(log), {"generation": state.generation, "images": state.images})
        if r % 3 == 2:  # now and then a compaction: a new FAISS index, new shards, the same images
            compact_index(index_dir)
            state = index_state(Path(index_dir))
            write_log(Path(log), {"generation": state.generation, "images": state.images})

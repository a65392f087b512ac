from __future__ import annotations

import threading
import time
from contextlib import closing

import numpy as np
import pytest
from PIL import Image

from crossrank.errors import InvalidArgumentError
from crossrank.ingest import Batch, IngestConfig, SourceItem, iter_batches

from ._images import BLUE, GREEN, RED, WHITE

COLORS = [RED, GREEN, BLUE, WHITE, (10, 20, 30), (200, 100, 50), (7, 7, 7), (90, 180, 240)]


def first_pixel(images: list[Image.Image]) -> np.ndarray:
    """A stand-in encoder preprocess: one row per image, (n, 3) uint8, from the top-left pixel."""
    return np.stack([np.asarray(im)[0, 0] for im in images])


@pytest.fixture
def mixed_items(tmp_path, solid, bad_files):
    """Good images (distinct colours) interleaved with bad files, in an unsorted order."""
    good = [solid(f"good/{i}.png", c) for i, c in enumerate(COLORS)]
    missing = tmp_path / "good/missing.png"
    order = [
        good[3],
        bad_files["text"],
        good[0],
        missing,
        good[5],
        bad_files["empty"],
        bad_files["truncated_jpeg"],
        good[1],
        good[7],
        good[2],
        bad_files["bomb"],
        good[6],
        good[4],
    ]
    items = [SourceItem(path=p, extra={"n": i}) for i, p in enumerate(order)]
    colors = {p: COLORS[i] for i, p in enumerate(good)}
    return items, colors


def collect(batches) -> list[Batch]:
    with closing(batches):
        return list(batches)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_records_follow_items_and_skipped_files_do_not_shift_them(mixed_items, workers):
    items, colors = mixed_items
    config = IngestConfig(workers=workers, chunk_size=2, prefetch_batches=1)
    batches = collect(iter_batches(items, batch_size=4, config=config, preprocess=first_pixel))

    assert [b.start for b in batches] == [0, 4, 8, 12]
    for b in batches:  # each batch accounts for exactly its slice of items, in order
        part = items[b.start : b.start + b.n_items]
        assert [r.item for r in b.records] == [i for i in part if i.path in colors]
        assert [s.path for s in b.skipped] == [str(i.path) for i in part if i.path not in colors]
        if b.records:  # pixel rows line up with records across chunk joins and skips
            assert b.pixels.tolist() == [list(colors[r.item.path]) for r in b.records]
    records = [r for b in batches for r in b.records]
    assert [r.item.extra["n"] for r in records] == [0, 2, 4, 7, 8, 9, 11, 12]
    reasons = {s.path.rsplit("/", 1)[1]: s.reason for b in batches for s in b.skipped}
    assert reasons == {
        "notes.png": "not an image (cannot identify format)",
        "missing.png": "file not found",
        "empty.png": "empty file (0 bytes)",
        "truncated.jpg": "truncated image data",
        "bomb.png": "decompression bomb: 400000000 pixels > limit 89478485",
    }


def test_without_preprocess_batches_carry_rgb_images(mixed_items):
    items, colors = mixed_items
    batches = collect(iter_batches(items, batch_size=5, config=IngestConfig(workers=2)))
    for b in batches:
        assert b.pixels is None
        assert len(b.images) == len(b.records)
        for im, r in zip(b.images, b.records, strict=True):
            assert im.mode == "RGB" and im.size == (r.width, r.height)
            assert im.getpixel((0, 0)) == colors[r.item.path]


def test_with_preprocess_batches_carry_no_images(mixed_items):
    items, _ = mixed_items
    for b in collect(iter_batches(items, batch_size=5, preprocess=first_pixel)):
        assert b.images is None


def test_a_batch_of_only_bad_files_has_no_pixels(bad_files, solid):
    items = [bad_files["empty"], bad_files["text"], solid("ok.png", RED)]
    first, second = collect(iter_batches(items, batch_size=2, preprocess=first_pixel))
    assert first.records == [] and first.pixels is None and len(first.skipped) == 2
    assert first.n_items == 2
    assert second.pixels.tolist() == [list(RED)]


def test_plain_paths_are_accepted_as_items(solid, tmp_path, monkeypatch):
    solid("a.png", RED)
    monkeypatch.chdir(tmp_path)
    (batch,) = collect(iter_batches(["a.png"], batch_size=8))
    assert batch.records[0].item == SourceItem(path=tmp_path / "a.png")


def test_preprocess_runs_on_the_decode_threads(mixed_items):
    items, _ = mixed_items
    threads: set[str] = set()

    def preprocess(images):
        threads.add(threading.current_thread().name)
        return first_pixel(images)

    config = IngestConfig(workers=2)
    collect(iter_batches(items, batch_size=4, config=config, preprocess=preprocess))
    assert threads and all(name.startswith("crossrank-decode") for name in threads)


def test_decoding_stays_at_most_prefetch_batches_ahead(solid):
    paths = [solid(f"{i:02d}.png", RED) for i in range(24)]
    lock = threading.Lock()
    decoded = [0]

    def counting(images):
        with lock:
            decoded[0] += len(images)
        return first_pixel(images)

    batch_size, prefetch = 2, 1
    config = IngestConfig(workers=3, chunk_size=1, prefetch_batches=prefetch)
    batches = iter_batches(paths, batch_size=batch_size, config=config, preprocess=counting)
    with closing(batches):
        for b in batches:
            time.sleep(0.02)  # give a runaway producer every chance to run ahead
            held = b.start // batch_size
            with lock:  # while batch `held` is held, only held + 1 .. held + prefetch may decode
                assert decoded[0] <= (held + 1 + prefetch) * batch_size
    assert decoded[0] == 24


def test_leaving_early_cancels_the_queued_work(solid):
    paths = [solid(f"{i:02d}.png", GREEN if i < 2 else RED) for i in range(40)]  # batch 0: green
    gate = threading.Event()
    calls: list[int] = []

    def preprocess(images):
        calls.append(len(images))
        if images[0].getpixel((0, 0)) == RED:  # past batch 0: keep the workers busy, so the
            gate.wait(timeout=30)  # rest of the prefetched queue is still queued at close()
        return first_pixel(images)

    config = IngestConfig(workers=2, chunk_size=1, prefetch_batches=8)
    batches = iter_batches(paths, batch_size=2, config=config, preprocess=preprocess)
    next(batches)
    threading.Timer(0.3, gate.set).start()  # frees the two busy workers while close() waits
    batches.close()  # cancels what is queued (16 images prefetched), waits for what runs
    assert sum(calls) <= 4  # batch 0 and at most the two chunks running, never the queued ones


def test_torch_tensors_are_joined_across_chunks(solid):
    torch = pytest.importorskip("torch")
    paths = [solid(f"{i}.png", c) for i, c in enumerate(COLORS[:5])]

    def preprocess(images):
        arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (n, H, W, 3)
        return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (n, 3, H, W)

    config = IngestConfig(workers=2, chunk_size=2)
    (batch,) = collect(iter_batches(paths, batch_size=5, config=config, preprocess=preprocess))
    assert isinstance(batch.pixels, torch.Tensor) and batch.pixels.shape == (5, 3, 6, 8)
    assert batch.pixels[:, :, 0, 0].tolist() == [list(map(float, c)) for c in COLORS[:5]]


def test_dicts_and_lists_are_joined_across_chunks(solid):
    paths = [solid(f"{i}.png", c) for i, c in enumerate(COLORS[:3])]
    config = IngestConfig(workers=2, chunk_size=1)

    (batch,) = collect(
        iter_batches(
            paths,
            batch_size=3,
            config=config,
            preprocess=lambda ims: {"pixel_values": first_pixel(ims)},
        )
    )
    assert batch.pixels["pixel_values"].tolist() == [list(c) for c in COLORS[:3]]
    (batch,) = collect(
        iter_batches(
            paths, batch_size=3, config=config, preprocess=lambda ims: [im.size for im in ims]
        )
    )
    assert batch.pixels == [(8, 6)] * 3


def test_preprocess_output_that_cannot_be_joined_is_refused(solid):
    paths = [solid(f"{i}.png", RED) for i in range(2)]
    config = IngestConfig(workers=1, chunk_size=1)
    batches = iter_batches(paths, batch_size=2, config=config, preprocess=lambda ims: object())
    with pytest.raises(InvalidArgumentError, match=r"returned a object, which cannot be joined"):
        collect(batches)
    # One chunk per batch needs no join: any output passes through.
    whole = IngestConfig(workers=1, chunk_size=2)
    (batch,) = collect(iter_batches(paths, batch_size=2, config=whole, preprocess=lambda ims: "x"))
    assert batch.pixels == "x"


def test_preprocess_returning_the_wrong_row_count_is_refused(solid):
    paths = [solid(f"{i}.png", RED) for i in range(3)]
    batches = iter_batches(paths, batch_size=3, preprocess=lambda ims: first_pixel(ims)[:1])
    with pytest.raises(InvalidArgumentError, match=r"preprocess returned 1 rows for 3 images"):
        collect(batches)


def test_preprocess_errors_propagate_with_the_files_named(solid):
    path = solid("a.png", RED)

    def broken(images):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as info:
        collect(iter_batches([path], batch_size=1, preprocess=broken))
    assert any(str(path) in note for note in info.value.__notes__)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_batch_size_must_be_a_positive_int(batch_size):
    with pytest.raises(InvalidArgumentError, match=r"batch_size must be a positive int"):
        iter_batches([], batch_size=batch_size)  # raised at the call, not at the first next()


def test_preprocess_must_be_callable():
    with pytest.raises(InvalidArgumentError, match=r"preprocess must be a callable .* got str"):
        iter_batches([], batch_size=2, preprocess="clip")


def test_no_items_give_no_batches():
    assert collect(iter_batches([], batch_size=4)) == []

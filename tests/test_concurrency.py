"""Readers and a writer at once: 8 threads search one Index while another process adds, removes
and compacts; every result must come whole from one committed generation."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from crossrank import Index
from crossrank.write.build import build_index

from ._living import index_state, write_log, writer_context, writer_loop
from .conftest import write_images

QUERY = "a red circle left of a blue square"


def test_eight_threads_search_while_another_process_adds_and_removes(tmp_path, tiny_clip):
    source = tmp_path / "photos"
    write_images(source, 8, seed=60)
    index_dir = tmp_path / "busy.idx"
    build_index(source, index_dir, model=tiny_clip, device="cpu", batch_size=8, workers=1)
    log = tmp_path / "commits.jsonl"
    first = index_state(index_dir)
    write_log(log, {"generation": first.generation, "images": first.images})

    index = Index.open(index_dir, device="cpu")
    _ = index.encoder  # loaded once, before the threads start
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((3, index.first_stage.d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    seen: list[tuple[int, dict[int, str]]] = []
    errors: list[BaseException] = []
    writing = threading.Event()
    writing.set()

    def read(t: int) -> None:
        local = np.random.default_rng(t)
        deadline = time.monotonic() + 40  # bounded even if the writer hangs
        rounds = 0
        while (writing.is_set() or rounds < 3) and time.monotonic() < deadline and rounds < 5000:
            rounds += 1
            try:
                if local.random() < 0.3:
                    index.refresh()
                if (
                    t % 4 == 0
                ):  # text, reranked over every candidate: patches and metadata of one generation
                    results = [index.search(QUERY, k=64, rerank_k=64, reranker="maxsim")]
                elif t % 4 == 1:  # through the where pre-filter
                    results = index.search_vectors(xq, k=64, where="width > 0")
                else:
                    results = index.search_vectors(xq, k=64)
            except BaseException as e:
                errors.append(e)
                return
            for result in results:  # k exceeds the image count: a result lists every live image
                seen.append((result.generation, {h.id: h.path for h in result}))

    threads = [threading.Thread(target=read, args=(t,), name=f"reader-{t}") for t in range(8)]
    writer = writer_context().Process(
        target=writer_loop, args=(str(index_dir), str(source), str(log), 6, 20.0, 0)
    )
    writer.start()
    for thread in threads:
        thread.start()
    writer.join(90)
    writing.clear()
    for thread in threads:
        thread.join(60)
    if writer.is_alive():
        writer.kill()
    assert writer.exitcode == 0
    assert not errors, errors[:3]
    assert not any(thread.is_alive() for thread in threads)

    committed = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        committed[entry["generation"]] = {int(i): p for i, p in entry["images"].items()}
    assert (
        len(committed) >= 5
    )  # the writer got through at least two rounds, even on a loaded machine
    generations = {g for g, _ in seen}
    assert generations <= set(committed)
    assert len(generations) >= 2  # the readers refreshed while the writer committed
    for generation, images in seen:
        assert images == committed[generation], generation  # exactly one generation's images, paths
    index.refresh()
    assert index.generation == max(committed) and len(index) == len(committed[max(committed)])
    index.close()

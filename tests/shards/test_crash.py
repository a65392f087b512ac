"""Crash safety across shards: ``crossrank add``/``remove``/``compact`` on a sharded index killed
with SIGKILL between (and during) the shard commits and the switch of ``shards.json`` (``-m slow``
kills ``add`` at more points).

After each kill a reader sees the state before the command or the state after it, never a mix
(some shards' new generations without the others'); ``verify`` passes; every image is found by
its own vector; and the same command again completes the work and leaves each shard with only
the generation ``shards.json`` names.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import crossrank
from crossrank.shards import read_shards_manifest, verify_sharded
from crossrank.store import list_generations, list_tmp_dirs

from .._living import run_in_process
from ..conftest import write_images
from .test_equality import _stored


def _state(root: Path) -> dict[int, str]:
    """``{id: path}`` of the images a reader of the sharded index sees; checks they are sound."""
    assert verify_sharded(root) == [], verify_sharded(root)
    with crossrank.open(root, device="cpu") as index:
        table = index.metadata(columns=["id", "path"])
        ids, paths = table.column("id").to_pylist(), table.column("path").to_pylist()
        state = dict(zip(ids, paths, strict=True))
        stored = _stored(root)
        live = np.array(sorted(state), dtype=np.int64)
        xq = np.stack([stored[i] for i in live.tolist()])
        found = [r[0].id for r in index.search_vectors(xq, k=2)]
        assert found == live.tolist()  # every image is its own nearest neighbour
        assert len(index) == live.size == index.info()["counts"]["images"]
    return state


def _clean(root: Path) -> None:
    """Each shard holds only the generation shards.json names, and no temporary folder."""
    for ref in read_shards_manifest(root).shards:
        assert [g.number for g in list_generations(ref.path)] == [ref.generation], ref.name
        assert list_tmp_dirs(ref.path) == []


def _copy(sharded: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / name, ignore=shutil.ignore_patterns("*.pin")))


COMMITTED = {"shards-after-manifest", "gc-trashed"}  # points after the switch of shards.json


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("encoded@2", marks=pytest.mark.slow),
        "after-manifest@1",  # one shard committed its generation, the others not yet
        pytest.param("shards-committed", marks=pytest.mark.slow),  # shards.json not switched yet
        # the new shards.json is durable under its temporary name
        pytest.param("shards-manifest-written", marks=pytest.mark.slow),
        "shards-after-manifest",
        pytest.param("gc-trashed", marks=pytest.mark.slow),  # collecting old shard generations
    ],
)
def test_add_killed_is_all_or_nothing(pair, tmp_path: Path, point: str) -> None:
    from crossrank.shards import add_sharded

    index_dir = _copy(pair[1], tmp_path, "sharded.idx")
    before = _state(index_dir)
    source = tmp_path / "new"
    write_images(source, 4, seed=404)  # ids 41..44: every shard gets one or two
    argv = ["add", str(source), "--index", str(index_dir), "--device", "cpu", "--json"]
    code = run_in_process([*argv, "--batch-size", "1", "--workers", "1"], point)
    assert code == -signal.SIGKILL, f"not killed at {point}: exit {code}"
    state = _state(index_dir)
    committed = point.partition("@")[0] in COMMITTED
    assert len(state) == len(before) + (4 if committed else 0), point
    if not committed:
        assert state == before, point
    report = add_sharded(source, index_dir, device="cpu", workers=1)  # the same command again
    assert report.added == (0 if committed else 4), point
    final = _state(index_dir)
    assert sorted(final) == list(range(45)), point  # new ids follow the old ones; none lost
    assert {p for i, p in final.items() if i >= 41} == {str(p) for p in source.glob("*.png")}
    _clean(index_dir)


@pytest.mark.parametrize("point", ["after-manifest@2", "shards-committed"])
def test_remove_killed_is_all_or_nothing(pair, tmp_path: Path, point: str) -> None:
    from crossrank.shards import remove_sharded

    index_dir = _copy(pair[1], tmp_path, "sharded.idx")
    before = _state(index_dir)
    victims = [0, 1, 2, 5]  # in every shard
    code = run_in_process(["remove", str(index_dir), "--ids", "0,1,2,5", "--json"], point)
    assert code == -signal.SIGKILL
    assert _state(index_dir) == before, point
    report = remove_sharded(index_dir, ids=victims)
    assert report.committed and list(report.removed) == victims
    assert sorted(_state(index_dir)) == [i for i in range(41) if i not in victims]
    _clean(index_dir)


def test_compact_killed_between_shards_keeps_the_old_set(pair, tmp_path: Path) -> None:
    from crossrank.shards import compact_sharded, remove_sharded

    index_dir = _copy(pair[1], tmp_path, "sharded.idx")
    remove_sharded(index_dir, ids=[3, 4, 5])
    before = _state(index_dir)
    top = read_shards_manifest(index_dir).generation
    code = run_in_process(["compact", str(index_dir), "--json"], "after-manifest@1")
    assert code == -signal.SIGKILL
    assert _state(index_dir) == before and read_shards_manifest(index_dir).generation == top
    report = compact_sharded(index_dir)
    assert report.committed and report.dropped == 3
    assert _state(index_dir) == before
    _clean(index_dir)

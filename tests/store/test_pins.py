"""Reader pins and garbage collection: what readers hold stays, the rest goes, crashes are safe."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from crossrank.store import (
    Generation,
    WriterLock,
    clean_interrupted,
    collect_garbage,
    list_generations,
    live_pins,
    pin_current,
    read_manifest,
)

_PIN = """
import sys, time
from crossrank.store import pin_current
manifest, pin = pin_current(sys.argv[1])
print(manifest.generation, flush=True)
time.sleep(60)
"""


def _numbers(root: Path) -> list[int]:
    return [g.number for g in list_generations(root)]


def test_a_pinned_generation_survives_commits_until_released(tmp_path, make_generation):
    root = tmp_path / "idx"
    make_generation(root, seed=0)
    manifest, pin = pin_current(root)
    assert (manifest.generation, pin.held) == (1, True) and live_pins(root) == {1: 1}
    make_generation(root, n=5, seed=1)
    make_generation(root, n=6, seed=2)
    assert _numbers(root) == [1, 3]  # 2 was never held; 1 is
    np.testing.assert_array_equal(Generation(manifest.generation_path).ids(), np.arange(23) * 2)
    pin.release()
    assert live_pins(root) == {}
    with WriterLock(root) as lock:
        assert collect_garbage(root, lock) == [1]
    assert _numbers(root) == [3]


def test_a_dead_reader_does_not_hold_its_generation(tmp_path, make_generation):
    root = tmp_path / "idx"
    make_generation(root, seed=0)
    reader = subprocess.Popen(
        [sys.executable, "-c", _PIN, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "1"
        make_generation(root, n=5, seed=1)
        assert _numbers(root) == [1, 2] and live_pins(root) == {1: 1}
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        make_generation(root, n=6, seed=2)
        assert _numbers(root) == [3]
        assert list((root / "readers").iterdir()) == []  # the dead reader's pin went with it
    finally:
        reader.kill()
        reader.wait()


def test_a_crash_in_the_middle_of_collecting_is_finished_later(tmp_path, make_generation):
    root = tmp_path / "idx"
    make_generation(root, seed=0)
    trash = root / ".trash-gen-000000.999"  # what a collector killed after renaming leaves
    (trash / "sub").mkdir(parents=True)
    (trash / "sub" / "patches-000.npy").write_bytes(b"x")
    tmp = root / ".gen-000007.tmp-999"  # and a writer killed before renaming
    tmp.mkdir()
    (root / ".manifest.json.tmp-999").write_text("{")
    assert read_manifest(root).generation == 1  # readers never look at any of it
    with WriterLock(root) as lock:
        assert sorted(clean_interrupted(root, lock)) == sorted(
            [trash.name, tmp.name, ".manifest.json.tmp-999"]
        )
    assert sorted(p.name for p in root.iterdir()) == [
        "gen-000001",
        "manifest.json",
        "readers",
        "writer.lock",
    ]


def test_a_pin_that_cannot_be_made_is_a_no_op(tmp_path, make_generation):
    root = tmp_path / "idx"
    make_generation(root, seed=0)
    (root / "readers").rmdir()
    (root / "readers").write_text("not a folder")  # as good as a read-only index directory
    manifest, pin = pin_current(root)
    assert manifest.generation == 1 and not pin.held
    pin.release()

"""Crash safety: writers killed with SIGKILL at every named point of the commit protocol, and
(``-m slow``) real ``crossrank`` processes killed at random moments.

After each kill: the index opens, ``verify`` passes, the committed state is exactly the state
before the command or the state after it (never a mix), every image of it is found, and running
the command again completes the work with no image twice.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossrank.store import list_tmp_dirs
from crossrank.store._crash import CRASH_POINTS

from ._living import State, assert_sound, index_state, run_in_process
from .conftest import write_images


@pytest.fixture(scope="module")
def crash_base(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, Path]:
    """A source folder of 10 images and an index of 8 of them (the 2 in more/ are for `add`)."""
    from crossrank.write.build import build_index

    root = tmp_path_factory.mktemp("crash")
    source = root / "photos"
    write_images(source, 8, seed=21)
    index_dir = root / "base.idx"
    build_index(source, index_dir, model=tiny_clip, device="cpu", batch_size=4, workers=1)
    write_images(source / "more", 2, seed=22)
    return source, index_dir


def _fresh_copy(index_dir: Path, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(index_dir, dest, ignore=shutil.ignore_patterns("*.pin"))
    return dest


def _check_after_crash(
    index_dir: Path, before: State | None, exit_code: int | None, point: str
) -> State | None:
    assert exit_code == -signal.SIGKILL, (
        f"the writer was to be killed at {point}, but exited with {exit_code}"
    )
    if before is None and index_state(index_dir) is None:
        return None  # a first build killed before its commit: still no index, nothing to check
    return assert_sound(index_dir)


def _leftovers(index_dir: Path) -> list[str]:
    return sorted(
        p.name for p in index_dir.iterdir() if p.name.startswith((".gen-", ".trash-", ".manifest"))
    )


# Every point a remove passes. The commit protocol is shared by every writer, so the default run
# kills add and build only at their own points (and one commit point each); `-m slow` kills every
# command at every point it passes.
REMOVE_POINTS = [
    "lock-acquired",
    "segments-linked",
    "segments-written",
    "generation-written",
    "before-rename",
    "after-rename",
    "manifest-written",
    "after-manifest",
    "gc-trashed",
    "gc-deleting@2",
    "after-gc",
]
ADD_POINTS = ["add-hashed", "encoded", "after-manifest"]
ADD_POINTS_SLOW = [
    "lock-acquired",
    "encoded@2",
    "segments-linked",
    "segments-written",
    "generation-written",
    "before-rename",
    "after-rename",
    "manifest-written",
    "gc-trashed",
    "gc-deleting",
    "after-gc",
]
COMPACT_POINTS = ["compact-rewriting", "after-rename", "gc-trashed"]
COMPACT_POINTS_SLOW = [
    "lock-acquired",
    "segments-written",
    "generation-written",
    "before-rename",
    "manifest-written",
    "after-manifest",
    "gc-deleting",
    "after-gc",
]
BUILD_POINTS = [("encoded", True), ("after-rename", False)]
BUILD_POINTS_SLOW = [
    (point, fresh)
    for fresh in (True, False)
    for point in [
        "lock-acquired",
        "encoded",
        "segments-written",
        "generation-written",
        "before-rename",
        "after-rename",
        "manifest-written",
        "after-manifest",
        "gc-trashed",
        "after-gc",
    ]
    if (point, fresh) not in BUILD_POINTS and not (fresh and point.startswith("gc-"))
]


def test_every_crash_point_is_exercised() -> None:
    points = REMOVE_POINTS + ADD_POINTS + COMPACT_POINTS + [p for p, _ in BUILD_POINTS]
    assert {p.partition("@")[0] for p in points} == set(CRASH_POINTS)


def _kill_remove(base: Path, tmp_path: Path, points: list[str]) -> None:
    from crossrank.write import remove_images

    before = index_state(base)
    victims = sorted(before.images)[1:3]
    after_images = {i: p for i, p in before.images.items() if i not in victims}
    for point in points:
        index_dir = _fresh_copy(base, tmp_path, f"remove-{point}")
        code = run_in_process(
            ["remove", str(index_dir), "--ids", ",".join(map(str, victims)), "--json"], point
        )
        state = _check_after_crash(index_dir, before, code, point)
        assert state.images in (before.images, after_images), point  # all or nothing
        committed = state.images == after_images
        assert committed == (
            CRASH_POINTS.index(point.partition("@")[0]) >= CRASH_POINTS.index("after-manifest")
        )
        report = remove_images(index_dir, ids=victims)  # the same command again
        assert report.committed != committed and set(report.already_removed) == (
            set(victims) if committed else set()
        )
        final = assert_sound(index_dir)
        assert final.images == after_images, point
        assert _leftovers(index_dir) == [], point  # the next writer cleaned up after the dead one


def _kill_add(source: Path, base: Path, tmp_path: Path, points: list[str]) -> None:
    from crossrank.write import add_images

    before = index_state(base)
    for point in points:
        index_dir = _fresh_copy(base, tmp_path, f"add-{point}")
        code = run_in_process(
            [
                "add",
                str(source),
                "--index",
                str(index_dir),
                "--device",
                "cpu",
                "--json",
                "--batch-size",
                "1",
                "--workers",
                "1",
            ],
            point,
        )
        state = _check_after_crash(index_dir, before, code, point)
        assert len(state.images) in (8, 10), point
        if len(state.images) == 8:
            assert state.images == before.images, point
        report = add_images(source, index_dir, device="cpu", workers=1)  # the same command again
        assert report.added == (2 if len(state.images) == 8 else 0), point
        final = assert_sound(index_dir)
        assert sorted(final.images.values()) == sorted(str(p) for p in source.rglob("*.png")), point
        assert sorted(final.images) == list(range(10)), (
            point
        )  # new ids follow the old ones; none lost
        assert list_tmp_dirs(index_dir) == [] and _leftovers(index_dir) == [], point


def _kill_compact(base: Path, tmp_path: Path, points: list[str]) -> None:
    from crossrank.store import Generation
    from crossrank.write import compact_index, remove_images

    prepared = _fresh_copy(base, tmp_path, "compact-base")
    remove_images(prepared, ids=[0, 5])
    before = index_state(prepared)
    for point in points:
        index_dir = _fresh_copy(prepared, tmp_path, f"compact-{point}")
        code = run_in_process(["compact", str(index_dir), "--json"], point)
        state = _check_after_crash(index_dir, before, code, point)
        assert state.images == before.images, point  # compaction never changes what is found
        compact_index(index_dir)
        final = assert_sound(index_dir)
        assert final.images == before.images
        assert Generation.current(index_dir).tombstones().size == 0, point
        assert _leftovers(index_dir) == [], point


def _kill_build(
    source: Path, base: Path, tmp_path: Path, model: Path, points: list[tuple[str, bool]]
) -> None:
    from crossrank.write.build import build_index

    before = index_state(base)
    for point, fresh in points:
        name = f"build-{point}-{'fresh' if fresh else 'overwrite'}.idx"
        index_dir = tmp_path / name if fresh else _fresh_copy(base, tmp_path, name)
        argv = [
            "build",
            str(source),
            "--index",
            str(index_dir),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--overwrite",
            "--json",
        ]
        code = run_in_process(argv, point)
        state = _check_after_crash(index_dir, None if fresh else before, code, point)
        if state is not None and len(state.images) == 8:
            assert state.images == before.images, point
        build_index(
            source, index_dir, model=model, device="cpu", batch_size=4, workers=1, overwrite=True
        )
        final = assert_sound(index_dir)
        assert sorted(final.images.values()) == sorted(str(p) for p in source.rglob("*.png")), point
        if not fresh:  # a rebuild gives new ids: an id never names two images
            assert min(final.images) >= 8, point
        assert _leftovers(index_dir) == [], point


def test_remove_killed_at_every_commit_point(crash_base, tmp_path):
    _kill_remove(crash_base[1], tmp_path, REMOVE_POINTS)


def test_add_killed_at_its_own_points(crash_base, tmp_path):
    _kill_add(*crash_base, tmp_path, ADD_POINTS)


def test_compact_killed_mid_rewrite_and_mid_commit(crash_base, tmp_path):
    _kill_compact(crash_base[1], tmp_path, COMPACT_POINTS)


def test_build_killed_mid_encoding_and_mid_commit(crash_base, tmp_path, tiny_clip):
    _kill_build(*crash_base, tmp_path, tiny_clip, BUILD_POINTS)


@pytest.mark.slow
def test_add_compact_and_build_killed_at_every_point(crash_base, tmp_path, tiny_clip):
    _kill_add(*crash_base, tmp_path, ADD_POINTS_SLOW)
    _kill_compact(crash_base[1], tmp_path, COMPACT_POINTS_SLOW)
    _kill_build(*crash_base, tmp_path, tiny_clip, BUILD_POINTS_SLOW)


# -- random moments, real processes ---------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from crossrank.cli import main; main()", *args]


@pytest.mark.slow
def test_real_commands_killed_at_random_moments(tmp_path, tiny_clip):
    """SIGKILL real `crossrank build/add/remove/compact` processes at random moments (seeded)."""
    import os

    from crossrank.write import add_images, compact_index, remove_images

    rng = np.random.default_rng(7)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CROSSRANK_CRASH_AT", None)
    source = tmp_path / "photos"
    write_images(source / "a", 24, seed=31)
    index_dir = tmp_path / "live.idx"
    build = [
        "build",
        str(source),
        "--index",
        str(index_dir),
        "--model",
        str(tiny_clip),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--overwrite",
        "--json",
    ]
    # Kills are drawn over how long each command takes when nothing kills it, measured once on a
    # scratch copy (imports included).
    span: dict[str, float] = {}
    scratch = tmp_path / "scratch.idx"
    calibration = {
        "build": build,
        "add": [
            "add",
            str(source),
            "--index",
            str(scratch),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--json",
        ],
        "remove": ["remove", str(scratch), "--ids", "0,1,2", "--json"],
        "compact": ["compact", str(scratch), "--json"],
    }
    for op, argv in calibration.items():
        if op == "add":
            shutil.copytree(index_dir, scratch)
            write_images(source / "calibration", 6, seed=99)
        t0 = time.perf_counter()
        subprocess.run(_cli(*argv), env=env, check=True, capture_output=True, timeout=300)
        span[op] = time.perf_counter() - t0
        if op == "add":
            shutil.rmtree(source / "calibration")
    kills = 0
    for trial in range(24):
        before = index_state(index_dir)
        op = ["build", "add", "remove", "compact"][trial % 4]
        if op == "add":
            write_images(source / f"new-{trial}", 6, seed=100 + trial)
            argv = [
                "add",
                str(source),
                "--index",
                str(index_dir),
                "--device",
                "cpu",
                "--batch-size",
                "2",
                "--workers",
                "1",
                "--json",
            ]
        elif op == "remove":
            victims = rng.choice(
                sorted(before.images), size=min(3, len(before.images)), replace=False
            )
            argv = [
                "remove",
                str(index_dir),
                "--ids",
                ",".join(map(str, sorted(victims))),
                "--json",
            ]
        elif op == "compact":
            argv = ["compact", str(index_dir), "--json"]
        else:
            argv = build
        proc = subprocess.Popen(
            _cli(*argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(float(rng.uniform(0.1, 1.0) * span[op]))
        kills += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = assert_sound(index_dir)
        if op == "remove":
            assert state.images in (
                before.images,
                {i: p for i, p in before.images.items() if i not in set(victims.tolist())},
            )
            remove_images(index_dir, ids=victims.tolist())
        elif op == "add":
            add_images(source, index_dir, model=tiny_clip, device="cpu", workers=1)
        elif op == "compact":
            assert state.images == before.images
            compact_index(index_dir)
        else:
            assert sorted(state.images.values()) in (
                sorted(before.images.values()),
                sorted(str(p) for p in source.rglob("*.png")),
            )
            subprocess.run(_cli(*build), env=env, check=True, capture_output=True, timeout=300)
        final = assert_sound(index_dir)
        if op in ("add", "build"):
            assert sorted(final.images.values()) == sorted(str(p) for p in source.rglob("*.png"))
        assert _leftovers(index_dir) == []
    assert kills >= 12  # most kills landed while the command was working

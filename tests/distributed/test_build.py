"""``build_on_ray`` on a real local Ray cluster (2 CPUs): the one-process build's index, resuming
a killed one-process build and through a lost encoder actor; and a build that cannot finish
commits nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import committed_state
from tests.distributed.conftest import BATCH, N_IMAGES, index_contents

pytestmark = pytest.mark.ray

#: Files per resumable chunk in the resume test: two batches.
CHUNK = 2 * BATCH


def test_ray_build_resumes_a_killed_build_and_equals_the_one_process_build_after_an_actor_dies(
    ray_cluster, shapes_manifest: Path, local_build: Path, tmp_path: Path, monkeypatch
) -> None:
    from crossrank.distributed import build_on_ray
    from crossrank.distributed._tasks import CRASH_ONCE_ENV
    from crossrank.store._crash import CRASH_ENV

    # A one-process build SIGKILLed at its third batch keeps its first chunk (32 files) ...
    index = tmp_path / "ray.idx"
    code = (
        "from crossrank.write import build_index; "
        f"build_index({str(shapes_manifest)!r}, {str(index)!r}, device='cpu', "
        f"batch_size={BATCH}, workers=1, chunk_items={CHUNK})"
    )
    env = {**os.environ, CRASH_ENV: "encoded@3"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    # ... which the Ray build resumes, while one of its encoder actors dies.
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    seen: list[tuple[int, int]] = []
    report = build_on_ray(
        shapes_manifest,
        index,
        device="cpu",
        batch_size=BATCH,
        chunk_items=CHUNK,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert marker.exists(), "the test hook did not kill an encoder actor"
    assert report.resumed == CHUNK, "the kept chunk was not resumed"
    assert (report.indexed, report.skipped, report.duplicates) == (N_IMAGES, 2, 1)
    assert seen[0] == (CHUNK, N_IMAGES + 2) and seen[-1] == (N_IMAGES + 2, N_IMAGES + 2)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    want, got = index_contents(local_build), index_contents(index)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["vectors"], want["vectors"], rtol=0, atol=1e-5)
    # fp16 patches of float32 features equal to 1e-5: at most one fp16 step apart.
    np.testing.assert_allclose(got["patches"], want["patches"], rtol=2e-3, atol=1e-4)
    assert got["metadata"].equals(want["metadata"])  # paths, hashes, sizes, mtimes, `label`
    assert "label" in got["metadata"].column_names
    assert got["skipped"].to_pylist() == want["skipped"].to_pylist()
    reasons = [r["reason"] for r in got["skipped"].to_pylist()]
    assert reasons[0].startswith("not an image") and reasons[1].startswith("duplicate of ")
    assert got["counts"] == want["counts"]
    assert got["encoder"] == want["encoder"]


def test_a_build_whose_encoder_dies_past_its_retries_fails_in_one_line_and_commits_nothing(
    ray_cluster, shapes_manifest: Path, local_build: Path, tmp_path: Path, monkeypatch
) -> None:
    import crossrank.distributed.pipeline as ray_pipeline
    from crossrank.distributed import build_on_ray
    from crossrank.distributed._tasks import CRASH_ONCE_ENV
    from crossrank.errors import CrossrankError

    index = Path(shutil.copytree(local_build, tmp_path / "copy.idx"))
    before = committed_state(index)
    monkeypatch.setenv(CRASH_ONCE_ENV, str(tmp_path / "crashed"))
    monkeypatch.setattr(ray_pipeline, "_RETRIES", {"max_restarts": 0, "max_task_retries": 0})
    with pytest.raises(CrossrankError, match="the Ray build failed .*ActorDiedError") as info:
        build_on_ray(shapes_manifest, index, device="cpu", batch_size=BATCH, overwrite=True)
    assert "\n" not in str(info.value)
    assert "previous generation is intact" in str(info.value)
    assert committed_state(index) == before
    np.testing.assert_array_equal(
        index_contents(index)["vectors"], index_contents(local_build)["vectors"]
    )

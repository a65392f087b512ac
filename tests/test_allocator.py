import subprocess
import sys

import pytest

CODE = "from crossrank.allocator import keep_large_allocations as k; print(k(), k())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "CROSSRANK_ALLOCATOR")
    }
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applies_once_on_glibc_and_stays_applied():
    assert _run({}) == "True True"


@pytest.mark.parametrize(
    "env",
    [
        {"CROSSRANK_ALLOCATOR": "default"},
        {"MALLOC_MMAP_MAX_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
    ],
)
def test_an_explicit_choice_in_the_environment_is_left_alone(env):
    assert _run(env) == "False False"

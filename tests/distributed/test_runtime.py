"""Bad input to the Ray engine: one line each, before Ray starts or a model loads."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from crossrank.errors import DependencyError, InvalidArgumentError


def test_without_ray_a_build_names_the_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    from crossrank.distributed import build_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(DependencyError, match=r"pip install 'crossrank\[ray\]'"):
        build_on_ray(tmp_path / "src", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_ray_address_is_one_line_within_seconds(
    address: str, tmp_path: Path
) -> None:
    pytest.importorskip(
        "ray.data", reason="Ray Data is not installed: pip install 'crossrank[ray]'"
    )
    from crossrank.distributed import build_on_ray

    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="no Ray cluster answers there") as info:
        build_on_ray(tmp_path, tmp_path / "idx", ray_address=address.format(port=_closed_port()))
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value) and "ray start --head" in str(info.value)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("address", ["nowhere", "host:port", ":6379"])
def test_a_malformed_ray_address_is_refused(address: str) -> None:
    from crossrank.distributed import check_ray_address

    with pytest.raises(InvalidArgumentError, match="--ray-address must be HOST:PORT"):
        check_ray_address(address)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shards": 0}, "--shards must be a whole number of shards >= 1, got 0"),
        ({"num_encoders": 0}, "num_encoders must be an int >= 1"),
        ({"batch_size": True}, "batch_size must be an int >= 1"),
        ({"patch_codec": "zip"}, "zip"),
    ],
)
def test_bad_arguments_are_refused_before_ray_starts(kwargs, match, tmp_path: Path) -> None:
    from crossrank.distributed import build_on_ray

    with pytest.raises(InvalidArgumentError, match=match):
        build_on_ray(tmp_path, tmp_path / "idx", **kwargs)


def test_more_shards_than_files_is_refused_before_ray_starts(tmp_path: Path) -> None:
    pytest.importorskip(
        "ray.data", reason="Ray Data is not installed: pip install 'crossrank[ray]'"
    )
    import ray

    from crossrank.distributed import build_on_ray
    from tests.conftest import write_images

    write_images(tmp_path / "src", 3)
    running = ray.is_initialized()  # another test module's cluster may be up
    with pytest.raises(InvalidArgumentError, match="--shards 4 is more than the 3 files"):
        build_on_ray(tmp_path / "src", tmp_path / "idx", shards=4)
    assert ray.is_initialized() == running
    assert not (tmp_path / "idx").exists()


def test_resume_is_refused_for_a_sharded_build(tmp_path: Path) -> None:
    from crossrank.distributed import build_on_ray

    with pytest.raises(InvalidArgumentError, match="--resume is for an unsharded build"):
        build_on_ray(tmp_path, tmp_path / "idx", shards=2, resume=True)

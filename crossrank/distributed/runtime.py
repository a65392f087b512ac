"""Importing Ray, probing a cluster's address, and starting or joining a Ray runtime.

``ray.init(address=...)`` on an address nothing listens on can wait for a long time before it
gives up, so an address is first probed with a plain TCP connect and a short timeout: a wrong
``--ray-address`` is one line within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from crossrank.errors import DependencyError, InvalidArgumentError

__all__ = [
    "RAY_EXTRA_HINT",
    "check_ray_address",
    "quiet_ray_logs",
    "ray_runtime",
    "require_ray",
    "start_ray",
]

logger = logging.getLogger(__name__)

#: What to install for the Ray engine.
RAY_EXTRA_HINT = "pip install 'crossrank[ray]'"

#: Seconds a probe of a cluster's address waits for a TCP connection.
PROBE_TIMEOUT_S = 3.0


def require_ray() -> ModuleType:
    """Import Ray, or raise one line that names the extra to install.

    Returns:
        The ``ray`` module (with ``ray.data`` importable).

    Raises:
        DependencyError: Ray (or Ray Data) is not installed.
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise DependencyError(
            f"the Ray engine needs Ray Data, which is not installed ({e}); install it with "
            f"`{RAY_EXTRA_HINT}`"
        ) from e
    return ray


def check_ray_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a cluster address nothing answers on.

    Args:
        address: ``HOST:PORT`` of a Ray head node (the GCS port, 6379 by default), or ``auto``
            (the cluster ``ray start`` started on this machine; Ray itself finds it) or a
            ``ray://HOST:PORT`` client address (probed on its host and port).
        timeout: seconds to wait for a TCP connection.

    Raises:
        InvalidArgumentError: the address is malformed or nothing accepts a connection there.
    """
    text = address.strip()
    if text in ("auto", "local"):
        return
    hostport = text.removeprefix("ray://")
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgumentError(
            f"--ray-address must be HOST:PORT (the head node's `ray start --head` address, e.g. "
            f"127.0.0.1:6379), ray://HOST:PORT or auto, got {address!r}"
        )
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise InvalidArgumentError(
            f"--ray-address {address}: no Ray cluster answers there ({reason} after at most "
            f"{timeout:g} s); start one with `ray start --head` and pass the address it prints, "
            "or leave --ray-address out to run on a local Ray runtime"
        ) from e


def start_ray(ray: Any, address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start a local runtime, unless Ray is initialised already.

    Args:
        ray: the ``ray`` module.
        address: a cluster to join (probed first by :func:`check_ray_address`), or None for a
            local runtime on this machine.
        num_cpus: CPUs of a local runtime (None: all of this machine's); ignored when joining.

    Returns:
        Whether this call started (or joined) the runtime: the caller then shuts it down.

    Raises:
        InvalidArgumentError: ``address`` does not answer.
    """
    if ray.is_initialized():
        return False
    if address is not None:
        check_ray_address(address)
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    return True


#: Ray's own loggers: their INFO and WARNING lines (a dataset finished, progress bars disabled,
#: how the runtime authenticates) would interleave with crossrank's progress bar; errors still show.
_RAY_LOGGERS = ("ray", "ray.data")


@contextlib.contextmanager
def quiet_ray_logs() -> Iterator[None]:
    """Show only errors from Ray's Python loggers inside the block; their levels are restored."""
    loggers = [logging.getLogger(name) for name in _RAY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def ray_runtime(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Use the Ray runtime already initialised, join ``address``, or start a local one.

    A runtime this call started (or joined) is shut down when the block ends; one the caller had
    initialised already is left as it is.

    Args:
        address: a cluster to join (probed first by :func:`check_ray_address`), or None for a
            local runtime on this machine.
        num_cpus: CPUs of a local runtime (None: all of this machine's); ignored when joining.

    Yields:
        The ``ray`` module.

    Raises:
        DependencyError: Ray is not installed.
        InvalidArgumentError: ``address`` does not answer.
    """
    ray = require_ray()
    with quiet_ray_logs():
        started = start_ray(ray, address, num_cpus=num_cpus)
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()

"""Serving a sharded index on Ray: one actor per shard, behind the shards' coordinator.

Each shard of a sharded index (:mod:`crossrank.shards`) is opened by a Ray actor holding a
:class:`~crossrank.shards.ShardSearcher`; the coordinator in this process (encoding the query,
merging candidates, fusing scores) calls the actors through :class:`ActorShard`, a proxy with the
searcher's methods that waits for the actor's answer. Only query vectors, token features, ids,
scores and hits travel: a shard's vectors and patches stay where its actor runs.

Placement: an actor runs wherever Ray puts it, so every node must read the shard folders at the
paths ``shards.json`` records (a shared file system), unless a node offers the custom resource
``crossrank-shard-NNN`` (``ray start --resources='{"crossrank-shard-003": 1}'`` on the machine
whose disk holds shard 3): the actor of that shard then asks for a sliver of it, and so runs
there.

    from crossrank.distributed import open_on_ray
    with open_on_ray("photos.idx", ray_address="10.0.0.5:6379") as index:
        result = index.search("a red cube", k=10)

Search calls are read-only, so an actor lost mid-search is restarted (it reopens the same shard
generation) and the call retried, a bounded number of times; past that the search fails with one
line naming the shard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from crossrank.device import parse_precision
from crossrank.errors import CrossrankError, InvalidArgumentError

__all__ = ["ActorShard", "ShardActor", "ray_shard_factory", "open_on_ray", "shard_resource"]

logger = logging.getLogger(__name__)

#: Seconds a shard actor may take to be placed, start and open its shard.
OPEN_TIMEOUT_S = 120.0

#: Restarts of a lost shard actor, and retries of the call it was answering.
SHARD_RETRIES = {"max_restarts": 2, "max_task_retries": 2}


def shard_resource(index: int) -> str:
    """The custom resource that pins shard ``index``'s actor to a node: ``crossrank-shard-003``."""
    return f"crossrank-shard-{index:03d}"


class ActorShard:
    """A shard served by a Ray actor, with :class:`~crossrank.shards.ShardSearcher`'s methods.

    Every method call is sent to the actor and waited for; a crossrank error raised there is
    raised here as itself, any other failure as one :class:`CrossrankError` naming the shard.

    Args:
        ray: the ``ray`` module (initialised).
        actor: the handle of a :class:`ShardActor`.
        ref: the :class:`~crossrank.shards.ShardRef` it serves.
    """

    def __init__(self, ray: Any, actor: Any, ref: Any) -> None:
        self._ray = ray
        self._actor = actor
        self.ref = ref
        self._closed = False

    def _call(self, name: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(self._actor.call.remote(name, *args, **kwargs), timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise CrossrankError(
                f"{self.ref.name}: its Ray actor did not answer {name}() within {timeout:g} s; "
                "the cluster may have no room for it (`ray status` shows free CPUs, GPUs and "
                "resources)"
            ) from e
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CrossrankError):
                raise cause from None
            raise CrossrankError(
                f"{self.ref.name}: its Ray actor failed in {name}() ({_first_line(cause or e)})"
            ) from e
        except ray.exceptions.RayError as e:
            raise CrossrankError(
                f"{self.ref.name}: its Ray actor is lost ({type(e).__name__}: {_first_line(e)}); "
                "check the Ray cluster (`ray status`) and open the index again"
            ) from e

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, *args, **kwargs)

        call.__name__ = name
        return call

    def close(self) -> None:
        """Release the shard generation in the actor, then end the actor; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ray.get(self._actor.close.remote(), timeout=30)
        except Exception as e:  # the actor may be gone already; ending it is what matters
            logger.debug("closing %s: %s", self.ref.name, e)
        finally:
            self._ray.kill(self._actor, no_restart=True)

    def __repr__(self) -> str:
        return f"ActorShard({self.ref.name})"


class ShardActor:
    """What each shard's Ray actor holds: a :class:`~crossrank.shards.ShardSearcher`, or the
    error opening it raised.

    An actor whose constructor raises is marked dead by Ray and its error is hard to tell from a
    lost node; keeping the error and raising it from every call gives the caller the searcher's
    own one-line message (a missing shard, another model), named.

    Args:
        ref: the :class:`~crossrank.shards.ShardRef` to open.
        kwargs: for :class:`~crossrank.shards.ShardSearcher` (``device``, ``nprobe``,
            ``encoder``, ``precision``).
    """

    def __init__(self, ref: Any, **kwargs: Any) -> None:
        from crossrank.shards import ShardSearcher

        self._searcher: Any = None
        self._error: CrossrankError | None = None
        try:
            self._searcher = ShardSearcher(ref, **kwargs)
        except CrossrankError as e:
            self._error = e

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``searcher.name(*args, **kwargs)``; raises the opening error if there was one."""
        if self._error is not None:
            raise self._error
        if name.startswith("_"):
            raise AttributeError(f"ShardSearcher.{name} is not a shard call")
        return getattr(self._searcher, name)(*args, **kwargs)

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def ray_shard_factory(
    ray: Any,
    *,
    device: str = "cpu",
    nprobe: int | None = None,
    encoder: dict[str, Any] | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    open_timeout: float = OPEN_TIMEOUT_S,
    precision: str = "auto",
) -> Any:
    """A :data:`~crossrank.shards.coordinator.ShardFactory` that starts one actor per shard.

    Args:
        ray: the ``ray`` module, initialised.
        device: where each shard searches and reranks (``cpu``, ``cuda``; ``auto`` is ``cuda``
            when ``num_gpus`` > 0).
        nprobe: IVF lists probed per query (None: each shard's own).
        encoder: the sharded index's ``Encoder.info``; a shard of another model is refused,
            naming it.
        num_cpus: CPUs each actor reserves while it lives (a fraction lets more shards than
            CPUs share a machine); None: Ray's default.
        num_gpus: GPUs each actor reserves (a fraction shares one).
        open_timeout: seconds an actor may take to start and open its shard.
        precision: what each shard's reranker computes in (``auto``, ``float32``, ``bfloat16``).

    Returns:
        ``factory(ref) -> ActorShard``.
    """
    remote_cls = ray.remote(ShardActor)
    resources = ray.cluster_resources()

    def factory(ref: Any) -> ActorShard:
        options: dict[str, Any] = {
            **SHARD_RETRIES,
            "name": None,
            "num_gpus": num_gpus,
        }
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
        pin = shard_resource(ref.index)
        if pin in resources:
            options["resources"] = {pin: 0.01}
        actor = remote_cls.options(**options).remote(
            ref, device=device, nprobe=nprobe, encoder=encoder, precision=precision
        )
        shard = ActorShard(ray, actor, ref)
        try:  # wait for it to open: a missing shard or another model fails here, named
            shard._call("facts", timeout=open_timeout)
        except BaseException:
            shard.close()
            raise
        return shard

    return factory


def open_on_ray(
    path: str | Path,
    *,
    device: str = "auto",
    model: str | Path | None = None,
    nprobe: int | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    shard_gpus: float = 0,
    precision: str = "auto",
) -> Any:
    """Open a sharded index with one Ray actor per shard.

    The query is encoded (and results fused) in this process; each shard's filter, first stage,
    reranking and metadata join run in its actor. Results equal a search of the same index with
    the shards on local threads.

    Args:
        path: the sharded index folder (holding ``shards.json``).
        device: where queries are encoded here.
        model: the query encoder's model (default: the index's).
        nprobe: IVF lists probed per query in each shard.
        ray_address: a running cluster to join (``HOST:PORT``, probed first) or None for a local
            Ray runtime, started here and stopped when the index is closed. A runtime the caller
            already started is used as it is.
        num_cpus: CPUs of a local runtime (None: every CPU of this machine).
        shard_gpus: GPUs each shard actor reserves (its reranker runs there); 0: the CPU.
        precision: what the shards' rerankers compute in (as :meth:`crossrank.Index.open`).

    Returns:
        A :class:`~crossrank.shards.ShardedIndex` (an :class:`~crossrank.Index`): ``search``,
        ``search_batch``, ``search_vectors``, ``rerank``, ``metadata``...; close it (or use it in
        a ``with`` block) to end the actors.

    Raises:
        DependencyError: Ray is not installed.
        InvalidArgumentError: ``path`` is not a sharded index, or ``ray_address`` does not answer.
        IndexNotFoundError, IndexCorruptError, ModelMismatchError: a shard is missing, damaged or
            of another model (named).
    """
    from crossrank.distributed.runtime import (
        check_ray_address,
        quiet_ray_logs,
        require_ray,
        start_ray,
    )
    from crossrank.shards.layout import is_sharded, read_shards_manifest
    from crossrank.store import has_index

    path = Path(path)
    precision = str(parse_precision(precision))  # a bad value stops here, before Ray starts
    ray = require_ray()
    if not is_sharded(path):
        if has_index(path):
            raise InvalidArgumentError(
                f"{path} is an unsharded index; --engine ray serves a sharded index (one Ray "
                "actor per shard): build one with `crossrank build SOURCE --index DIR --shards N`, "
                "or search this one without --engine ray"
            )
        from crossrank.errors import IndexNotFoundError

        raise IndexNotFoundError(f"no sharded index in {path}; build one with --shards N")
    if ray_address is not None:
        check_ray_address(ray_address)
    top = read_shards_manifest(path)
    with quiet_ray_logs():
        started = start_ray(ray, ray_address, num_cpus=num_cpus)
    try:
        shard_device = ("cuda" if shard_gpus > 0 else "cpu") if device == "auto" else device
        # One CPU per shard actor, or an equal share when there are more shards than CPUs.
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        per_shard = max(0.01, min(1.0, int(100 * cpus / top.n_shards) / 100))
        factory = ray_shard_factory(
            ray,
            device=shard_device,
            nprobe=nprobe,
            encoder=top.encoder,
            num_cpus=per_shard,
            num_gpus=shard_gpus,
            precision=precision,
        )
        index = _sharded_index_class().open(
            path,
            device=device,
            model=model,
            nprobe=nprobe,
            factory=factory,
            remote=True,
            precision=precision,
        )
    except BaseException:
        if started:
            ray.shutdown()
        raise
    index._ray_started = started
    return index


def _sharded_index_class() -> type:
    from crossrank.shards.index import ShardedIndex

    class RayShardedIndex(ShardedIndex):
        """A :class:`~crossrank.shards.ShardedIndex` whose shards are Ray actors; closing it ends
        them, and stops the Ray runtime :func:`open_on_ray` started."""

        _ray_started = False

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self._ray_started:
                    self._ray_started = False
                    import ray

                    ray.shutdown()

    return RayShardedIndex

"""Crossrank on a Ray cluster: a Ray Data build, and one Ray actor per shard of a sharded index.

Ray is an optional extra (``pip install 'crossrank[ray]'``); nothing in the core imports this
package, and this package imports ``ray`` only inside the functions that need it, so
``import crossrank.distributed`` works without Ray and a call that needs it raises a one-line
:class:`~crossrank.errors.DependencyError` naming the extra.

    from crossrank.distributed import build_on_ray
    report = build_on_ray("photos/", "photos.idx")                  # a local Ray runtime
    report = build_on_ray("photos/", "photos.idx", ray_address="10.0.0.5:6379")  # join a cluster
    with open_on_ray("photos.idx") as index:          # a sharded index: one actor per shard
        index.search("a red cube", k=10)

See ``docs/scale.md`` for running on a cluster and the 100M-image plan.
"""

from crossrank.distributed.build import build_on_ray
from crossrank.distributed.runtime import RAY_EXTRA_HINT, check_ray_address, require_ray
from crossrank.distributed.serve import ActorShard, open_on_ray, ray_shard_factory

__all__ = [
    "RAY_EXTRA_HINT",
    "ActorShard",
    "build_on_ray",
    "check_ray_address",
    "open_on_ray",
    "ray_shard_factory",
    "require_ray",
]

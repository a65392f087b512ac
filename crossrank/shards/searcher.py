"""The per-shard operations of a sharded search: :class:`ShardSearcher`, one per shard.

A shard searcher opens one committed generation of one shard (a :class:`ShardRef`: the folder,
the generation and its shard manifest), pins it so that no writer deletes it, and answers the
few calls the coordinator (:mod:`crossrank.shards.coordinator`) makes during a search. Every
argument and result is a plain value (numpy arrays, strings, dicts, :class:`~crossrank.hits.Hit`),
so the same object can live in another thread, another process or a Ray actor on another machine
(``ray.remote(ShardSearcher).remote(ref)``); its patches never leave it.

The calls, in the order a search makes them:

1. :meth:`ShardSearcher.first_stage` ``(xq, k, where, filters, nprobe)``: the filter and the first
   stage on this shard: its top ``k`` ``(scores, ids)`` per query, and how many images it holds
   and how many the filter allows;
2. :meth:`ShardSearcher.rerank` ``(reranker, tokens, mask, ids, input_ids)``: the reranker's
   scores of this shard's candidates, from its own stored patches;
3. :meth:`ShardSearcher.hits` ``(ids, scores, first_scores, rerank_scores)``: the hits with their
   metadata rows, for the ids of this shard that made the final top ``k``;

plus :meth:`~ShardSearcher.explain`, :meth:`~ShardSearcher.stored_scores` (for
``Index.rerank``), :meth:`~ShardSearcher.metadata_table`, :meth:`~ShardSearcher.skipped`,
:meth:`~ShardSearcher.check_filter`, :meth:`~ShardSearcher.facts` and :meth:`~ShardSearcher.close`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import CrossrankError, IndexCorruptError, ModelMismatchError
from crossrank.search.snapshot import Snapshot
from crossrank.shards.layout import ShardRef, manifest_from_dict

if TYPE_CHECKING:
    import pyarrow as pa

    from crossrank.hits import Explanation, Hit
    from crossrank.rerank import Reranker
    from crossrank.store.filters import Filters

__all__ = ["ShardSearcher", "ShardCandidates", "open_shard_snapshot", "check_shard_folder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardCandidates:
    """What :meth:`ShardSearcher.first_stage` returns for a batch of ``m`` queries.

    Attributes:
        shard: the shard's number.
        scores: float32 ``(m, k')`` first-stage scores, best first (``k' <= k``).
        ids: int64 ``(m, k')`` global ids; ``-1`` where the shard had fewer candidates.
        size: images this shard can return (removed ones excluded).
        allowed: images of this shard the filter allows (``size`` without a filter).
    """

    shard: int
    scores: np.ndarray
    ids: np.ndarray
    size: int
    allowed: int


_PUT_BACK = (
    "put the shard folder back (or fix its path in shards.json), or rebuild the index with "
    "`crossrank build SOURCE --index DIR --shards N --overwrite`"
)


def check_shard_folder(ref: ShardRef, encoder: dict[str, Any] | None = None) -> None:
    """Refuse, naming the shard, a shard folder that is missing, holds no crossrank index, or
    holds one built with another model than ``encoder`` (the sharded index's).

    Raises:
        IndexNotFoundError: the folder is missing or holds no index.
        ModelMismatchError: the shard's own manifest records another model.
    """
    import json

    from crossrank.encoders import same_model
    from crossrank.errors import IndexNotFoundError
    from crossrank.store.manifest import MANIFEST_NAME

    root = Path(ref.path)
    if not root.is_dir():
        raise IndexNotFoundError(f"{ref.name} is missing; {_PUT_BACK}")
    try:
        own = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8")).get("encoder")
    except FileNotFoundError:
        raise IndexNotFoundError(f"{ref.name} holds no crossrank index; {_PUT_BACK}") from None
    except (OSError, ValueError, AttributeError):
        return  # a damaged shard manifest: the generation's own checks say more
    if encoder is not None and isinstance(own, dict) and not same_model(encoder, own):
        raise ModelMismatchError(
            f"{ref.name} was built with model {own.get('model_id')!r}, but the sharded index "
            f"with {encoder.get('model_id')!r}; {_PUT_BACK}"
        )


def open_shard_snapshot(
    ref: ShardRef,
    *,
    device: str = "cpu",
    nprobe: int | None = None,
    encoder: dict[str, Any] | None = None,
) -> Snapshot:
    """Pin and open the generation ``ref`` names; errors name the shard.

    Raises:
        IndexNotFoundError: the shard folder is missing or holds no index (named).
        ModelMismatchError: the shard was built with another model than ``encoder``.
        IndexCorruptError: its generation is missing or damaged (named).
    """
    from crossrank.store import ReaderPin

    check_shard_folder(ref, encoder)
    root = Path(ref.path)
    manifest = manifest_from_dict(root, ref.manifest)
    pin = ReaderPin(root, ref.generation)
    if not manifest.generation_path.is_dir():
        pin.release()
        raise IndexCorruptError(
            f"{ref.name} misses generation {ref.generation} ({manifest.generation_dir}), which "
            f"the sharded index names; {_PUT_BACK}"
        )
    try:
        return Snapshot(root, device=device, nprobe=nprobe, pinned=(manifest, pin))
    except CrossrankError as e:
        raise type(e)(f"{ref.name}: {e}") from e


class ShardSearcher:
    """One shard of a sharded index, opened at the generation the top manifest names.

    Thread-safe for searches (as :class:`crossrank.Index` is). Picklable arguments and results
    only, so a Ray actor can hold one (``ray.remote(ShardSearcher)``).

    Args:
        ref: the shard generation to open (from :func:`crossrank.shards.read_shards_manifest`).
        device: where the first stage searches and the reranker runs: ``cpu``, ``cuda``, ``auto``.
        nprobe: IVF lists probed per query (default: the shard's own).
        encoder: the ``Encoder.info`` the sharded index records; a shard built with another model
            is refused, naming the shard.
        precision: what the rerankers it loads by name or folder compute in (``auto``,
            ``float32``, ``bfloat16``).

    Raises:
        IndexNotFoundError: the shard folder is missing.
        IndexCorruptError: the named generation is missing or damaged.
        ModelMismatchError: the shard was built with another model than ``encoder``.
    """

    def __init__(
        self,
        ref: ShardRef,
        *,
        device: str = "cpu",
        nprobe: int | None = None,
        encoder: dict[str, Any] | None = None,
        precision: str = "auto",
    ) -> None:
        self.ref = ref
        self.device = device
        self.precision = precision
        self._snap = open_shard_snapshot(ref, device=device, nprobe=nprobe, encoder=encoder)
        self._scorers: dict[str, Reranker | None] = {}
        self._lock = threading.Lock()

    # -- facts ----------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The opened generation (local use only: it does not pickle)."""
        return self._snap

    def facts(self) -> dict[str, Any]:
        """Counts and shapes of this shard generation: a JSON-able dict."""
        snap = self._snap
        info = snap.generation.info
        return {
            "shard": self.ref.index,
            "path": self.ref.path,
            "generation": snap.number,
            "images": len(snap),
            "rows": int(snap.ids.shape[0]),
            "tombstones": int(snap.tombstones.size),
            "skipped": info.n_skipped,
            "dim": int(snap.first_stage.d),
            "ntotal": int(snap.first_stage.ntotal),
            "factory": snap.first_stage.factory,
            "first_stage": dict(snap.manifest.first_stage),
            "patches": [int(snap.patches.shape[0]), int(snap.patches.shape[1])],
            "patch_codec": info.patch_codec,
            "patch_bytes_per_image": info.patch_bytes_per_image,
            "metadata_columns": list(snap.metadata.columns),
        }

    def __len__(self) -> int:
        return len(self._snap)

    # -- the search -----------------------------------------------------------------------------

    def check_filter(self, where: str | None, filters: Filters | None) -> int:
        """Run the filter (cached per generation) and return how many images it allows here.

        Raises:
            FilterError: a malformed ``where`` / ``filters`` or an unknown column.
        """
        from crossrank.search.pipeline import allowed_ids

        allowed = allowed_ids(self._snap, where, filters, {})
        return len(self._snap) if allowed is None else int(allowed.size)

    def first_stage(
        self,
        xq: np.ndarray,
        k: int,
        where: str | None = None,
        filters: Filters | None = None,
        nprobe: int | None = None,
    ) -> ShardCandidates:
        """This shard's top ``k`` candidates per query among the images the filter allows.

        Runs :func:`crossrank.search.pipeline.allowed_ids` and
        :func:`crossrank.search.pipeline.first_stage` on this shard, exactly as an unsharded
        search runs them on the whole index.

        Args:
            xq: float32 ``(m, d)`` query vectors.
            k: candidates per query (capped at the shard's size).
            where, filters: the search's filter (None: all).
            nprobe: IVF lists probed (None: the shard's own).
        """
        from crossrank.search.pipeline import allowed_ids, cap_at, first_stage

        snap = self._snap
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        allowed = allowed_ids(snap, where, filters, {})
        size = len(snap)
        n_allowed = size if allowed is None else int(allowed.size)
        m = xq.shape[0]
        if size == 0 or n_allowed == 0:
            empty = np.zeros((m, 0), np.float32), np.full((m, 0), -1, np.int64)
            return ShardCandidates(self.ref.index, *empty, size=size, allowed=n_allowed)
        D, I = first_stage(snap, xq, cap_at(k, size), allowed, nprobe=nprobe)
        return ShardCandidates(
            self.ref.index,
            np.asarray(D, dtype=np.float32),
            np.asarray(I, dtype=np.int64),
            size=size,
            allowed=n_allowed,
        )

    def _scorer(self, reranker: str | Reranker) -> Reranker | None:
        """A reranker object as it is; a spec (a name or folder) loaded once per searcher."""
        from crossrank.rerank import get_reranker

        if not isinstance(reranker, str):
            return reranker
        with self._lock:
            if reranker not in self._scorers:
                self._scorers[reranker] = get_reranker(
                    reranker,
                    device=self.device,
                    encoder_info=self._snap.manifest.encoder,
                    precision=self.precision,
                )
            return self._scorers[reranker]

    def rerank(
        self,
        reranker: str | Reranker,
        tokens: np.ndarray,
        mask: np.ndarray,
        ids: np.ndarray,
        input_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """The reranker's float32 scores of this shard's candidates ``ids`` (one query).

        Args:
            reranker: a :class:`~crossrank.rerank.Reranker` (local use) or what names one: a
                resolved name (``maxsim``, ``blip-itm``) or a trained reranker's folder, loaded
                once by this searcher.
            tokens, mask, input_ids: the query's token features, mask and token ids, as
                :func:`crossrank.search.encode.encode_queries` makes them.
            ids: global ids, each in this shard.
        """
        from crossrank.search.pipeline import rerank

        scorer = self._scorer(reranker)
        ids = np.asarray(ids, dtype=np.int64)
        if scorer is None or not ids.size:
            return np.zeros(ids.shape, np.float32)
        return rerank(self._snap, scorer, tokens, mask, ids, input_ids)

    def hits(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        first_scores: np.ndarray,
        rerank_scores: np.ndarray | None,
    ) -> tuple[Hit, ...]:
        """The hits of this shard's ``ids``, in the order given, with their metadata rows."""
        from crossrank.search.pipeline import join_metadata

        return join_metadata(
            self._snap,
            np.asarray(ids, dtype=np.int64),
            np.asarray(scores, dtype=np.float32),
            np.asarray(first_scores, dtype=np.float32),
            None if rerank_scores is None else np.asarray(rerank_scores, dtype=np.float32),
        )

    def explain(
        self,
        reranker: str | Reranker | None,
        tokens: np.ndarray | None,
        mask: np.ndarray | None,
        ids: np.ndarray,
        words: list[str | None] | None,
        input_ids: np.ndarray | None = None,
        label: str = "none",
    ) -> tuple[list[Explanation], str | None]:
        """Where each word looked in each of this shard's hits (see
        :func:`crossrank.search.pipeline.explain`)."""
        from crossrank.search.pipeline import explain

        scorer = None if reranker is None else self._scorer(reranker)
        return explain(
            self._snap, scorer, tokens, mask, np.asarray(ids, np.int64), words, input_ids, label
        )

    def stored_scores(self, xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products of one query vector ``xq`` ``(d,)`` with the stored vectors of ``ids``."""
        snap = self._snap
        rows = snap.generation.rows_of_ids(np.asarray(ids, dtype=np.int64))
        return (np.asarray(snap.vectors[rows], dtype=np.float32) @ xq).astype(np.float32)

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        """Those of ``ids`` this shard does not hold, or holds only as removed."""
        snap = self._snap
        ids = np.asarray(ids, dtype=np.int64)
        bad = ~np.isin(ids, np.asarray(snap.ids))
        if snap.tombstones.size:
            bad |= np.isin(ids, snap.tombstones)
        return ids[bad]

    # -- metadata -------------------------------------------------------------------------------

    def metadata_table(
        self,
        columns: list[str] | None = None,
        where: str | None = None,
        filters: Filters | None = None,
    ) -> pa.Table:
        """This shard's metadata rows (removed images excluded), as ``Index.metadata``."""
        snap = self._snap
        if not snap.tombstones.size:
            return snap.metadata.table(columns=columns, where=where, filters=filters)
        wanted = list(columns) if columns else list(snap.metadata.columns)
        table = snap.metadata.table(
            columns=wanted if "id" in wanted else ["id", *wanted], where=where, filters=filters
        )
        live = ~np.isin(table.column("id").to_numpy(), snap.tombstones)
        return table.filter(live).select(wanted)

    def skipped(self) -> pa.Table:
        """The files this shard's generation records as skipped."""
        return self._snap.metadata.skipped()

    def schema(self) -> pa.Schema:
        """The metadata schema."""
        return self._snap.metadata.schema

    def check_where(self, where: str) -> None:
        self._snap.metadata.check_where(where)

    def check_filters(self, filters: Filters) -> None:
        self._snap.metadata.check_filters(filters)

    def close(self) -> None:
        """Release the generation (its pin, metadata connection and maps); idempotent."""
        self._snap.close()

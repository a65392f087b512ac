"""The public entry point: :class:`Index` builds, opens and searches an index directory.

A search runs the stages of :mod:`crossrank.search.pipeline` in order: encode the query, compute
the allowed ids of the ``where`` filter (DuckDB), take ``rerank_k`` candidates from the first stage
(FAISS, or exact scoring when the allowed set is small), gather the candidates' stored patch
features, rescore them with the reranker in one batch, fuse, cut to ``k`` and join the metadata.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.device import Precision, parse_precision
from crossrank.errors import CrossrankError, InvalidArgumentError
from crossrank.hits import SearchResult
from crossrank.search.encode import (
    PreparedQueries,
    Query,
    encode_queries,
    prepare_queries,
    token_strings,
)
from crossrank.search.pipeline import allowed_ids, cap_at, check_k, search_snapshot, timed

if TYPE_CHECKING:
    import pyarrow as pa

    from crossrank.encoders import Encoder
    from crossrank.indexes import FirstStage
    from crossrank.rerank import Reranker
    from crossrank.search.snapshot import Snapshot
    from crossrank.store import Generation, Manifest, MetadataStore, PatchStore
    from crossrank.store.filters import Filters
    from crossrank.write import AddReport, CompactReport, PhaseProgressFn, RemoveReport
    from crossrank.write.build import BuildReport, ProgressFn

__all__ = ["Index", "Query", "DEFAULT_RERANKER"]

logger = logging.getLogger(__name__)


#: ``reranker="auto"``: a trained reranker when one exists (the index's own ``DIR/reranker/``,
#: ``blip-itm`` on a BLIP index, the shipped reranker for the index's encoder), else none: the
#: first stage alone. Image queries get none under ``auto`` (see :meth:`Index._plan`).
AUTO_RERANKER = "auto"
DEFAULT_RERANKER = AUTO_RERANKER

#: The folder inside an index directory that holds its default reranker (safetensors + config.json).
RERANKER_DIR = "reranker"


class Index:
    """An opened crossrank index: one committed generation of an index directory.

    One ``Index`` may be searched from many threads at once. It reads the generation that was
    current when it was opened (or last refreshed); writers commit new generations beside it
    without disturbing it, and never delete the generation it holds. :meth:`refresh` moves it to
    the newest generation; every search runs on one generation from start to end (its
    ``SearchResult.generation``), even when another thread refreshes meanwhile. :meth:`add`,
    :meth:`remove` and :meth:`compact` change the index and refresh.

    Example:
        >>> index = Index.build(  # doctest: +SKIP
        ...     "photos/", "photos.idx", model="openai/clip-vit-base-patch32"
        ... )
        >>> for hit in index.search("a red bicycle", k=5, where="width >= 512"):  # doctest: +SKIP
        ...     print(hit.score, hit.path)
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        model: str | Path | None = None,
        nprobe: int | None = None,
        precision: Precision | str = Precision.AUTO,
    ) -> None:
        """Use :meth:`Index.open`; this constructor is the same call."""
        self.path = Path(path)
        self.device = device
        self.precision = parse_precision(precision)
        self._model_override = model
        self._nprobe = nprobe
        self._snap: Snapshot | None = self._open_snapshot()
        self._snap_lock = threading.Lock()  # guards _snap and the users count of snapshots
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self.build_report: BuildReport | None = None  # set by Index.build
        self._encoder: Encoder | None = None
        self._rerankers: dict[str, _Choice] = {}
        self._lock = threading.Lock()
        if model is not None:  # a model named by the caller is checked now, not at the first search
            self._encoder = self._load_encoder()

    def _open_snapshot(self) -> Snapshot:
        """The committed generation, opened and pinned (a sharded index opens its shards)."""
        from crossrank.search.snapshot import Snapshot

        if (self.path / "shards.json").is_file():  # crossrank.shards.SHARDS_NAME, a layer above
            raise InvalidArgumentError(
                f"{self.path} is a sharded index; open it with crossrank.open({str(self.path)!r}) "
                "(which opens either kind), or search it with `crossrank search`"
            )
        return Snapshot(self.path, device=self.device, nprobe=self._nprobe)

    #: Runs a search's stages on the generation held (a sharded index fans them out instead).
    _search_snapshot = staticmethod(search_snapshot)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        model: str | Path | None = None,
        nprobe: int | None = None,
        precision: Precision | str = Precision.AUTO,
    ) -> Index:
        """Open the committed generation of an index directory.

        Args:
            path: the index directory.
            device: where queries are encoded and reranked: ``auto``, ``cpu`` or ``cuda``.
            model: the model to encode queries with; default the one the index was built with. A
                different model is refused (:class:`ModelMismatchError`); a moved copy of the same
                model is accepted.
            nprobe: IVF lists probed per query (default: the index's own).
            precision: what the rerankers it loads compute in (:class:`~crossrank.Precision`):
                ``auto`` (bf16 autocast on CUDA, float32 on the CPU), ``float32``, or
                ``bfloat16`` (on the CPU too: faster on CPUs with native bf16, scores move
                slightly). A :class:`~crossrank.rerank.Reranker` object passed to a search keeps
                its own.

        Raises:
            IndexNotFoundError: no committed index in ``path``.
        """
        return cls(Path(path), device=device, model=model, nprobe=nprobe, precision=precision)

    @classmethod
    def build(
        cls,
        source: str | Path,
        path: str | Path,
        *,
        model: str | Path | None = None,
        batch_size: int = 64,
        device: str = "auto",
        factory: str | None = None,
        nprobe: int | None = None,
        workers: int = 4,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
        patch_codec: str | None = None,
        resume: bool | None = None,
    ) -> Index:
        """Build an index from a folder or manifest and open it.

        See :func:`crossrank.write.build.build_index` for the arguments; the build's report is kept
        in ``index.build_report``.
        """
        from crossrank.write.build import build_index

        report = build_index(
            source,
            path,
            model=model,
            batch_size=batch_size,
            device=device,
            factory=factory,
            nprobe=nprobe,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            patch_codec=patch_codec,
            resume=resume,
        )
        index = cls.open(path, device=device, model=model)
        index.build_report = report
        return index

    @classmethod
    def build_from_arrays(
        cls,
        path: str | Path,
        vectors: Any,
        patches: Any,
        metadata: Any = None,
        *,
        ids: Any = None,
        model: str | Path | None = None,
        encoder_info: Mapping[str, Any] | None = None,
        factory: str | None = None,
        nprobe: int | None = None,
        patch_codec: str | None = None,
        overwrite: bool = False,
        device: str = "auto",
    ) -> Index:
        """Build an index from a backend's own pooled vectors, patches and metadata, and open it.

        Nothing is decoded or encoded: ``vectors`` ``(n, D)``, ``patches`` ``(n, P, d)`` (float16
        or float32) and ``metadata`` (a ``pyarrow.Table`` or anything ``pyarrow.table()`` takes;
        an optional ``path`` column) are written as one generation, as ``build`` writes it. Queries
        are encoded with ``model``; with ``encoder_info=`` instead the index is searched by
        vectors only (:meth:`search_vectors`; :meth:`search` of a text refuses in one line). See
        :func:`crossrank.write.build_from_arrays` for every argument and docs/backends.md.

        Example:
            >>> index = Index.build_from_arrays(  # doctest: +SKIP
            ...     "shop.idx", xb, patches, {"path": urls}, ids=product_ids, model="crossrank-demo"
            ... )
            >>> index.rerank("a red bicycle", ids=[3, 17, 42])  # doctest: +SKIP
        """
        from crossrank.write.arrays import build_from_arrays

        report = build_from_arrays(
            path,
            vectors,
            patches,
            metadata,
            ids=ids,
            model=model,
            encoder_info=encoder_info,
            factory=factory,
            nprobe=nprobe,
            patch_codec=patch_codec,
            overwrite=overwrite,
            device=device,
        )
        index = cls.open(path, device=device)
        index.build_report = report
        return index

    # -- the generation held -------------------------------------------------------------------

    def _current(self) -> Snapshot:
        snap = self._snap
        if snap is None:
            raise CrossrankError(f"index {self.path} was closed; open it again with Index.open")
        return snap

    @contextmanager
    def _use(self) -> Iterator[Snapshot]:
        """The snapshot a search runs on, kept open until the search ends (refresh or not)."""
        with self._snap_lock:
            snap = self._current()
            snap.users += 1
        try:
            yield snap
        finally:
            with self._snap_lock:
                snap.users -= 1
                done = snap.retired and snap.users == 0
            if done:
                snap.close()

    def _retire(self, snap: Snapshot) -> None:
        """Close ``snap`` now, or when its last search ends (the caller swapped it out)."""
        with self._snap_lock:
            snap.retired = True
            done = snap.users == 0
        if done:
            snap.close()

    @property
    def manifest(self) -> Manifest:
        """The manifest of the generation held."""
        return self._current().manifest

    @property
    def generation(self) -> int:
        """The number of the generation held."""
        return self._current().number

    @property
    def generation_dir(self) -> Path:
        """The folder of the generation held."""
        return self._current().manifest.generation_path

    @property
    def first_stage(self) -> FirstStage:
        """The FAISS first stage of the generation held (removed images included)."""
        return self._current().first_stage

    @property
    def patches(self) -> PatchStore:
        """The memory-mapped patch store of the generation held."""
        return self._current().patches

    @property
    def metadata_store(self) -> MetadataStore:
        """The metadata store of the generation held (removed images included)."""
        return self._current().metadata

    @property
    def stored(self) -> Generation:
        """The stored generation held, read-only: its vectors, ids, patch store and metadata.

        The accessor for code that reads an index's stored features directly (training a
        reranker, tools): ``index.stored.vectors()`` ``(n, d)`` float32 and
        ``index.stored.rows_of_ids(ids)`` map ids to rows of the vectors and the patch store.
        Removed images are included; :attr:`crossrank.store.Generation.live_ids` lists the rest.
        The generation stays valid while this Index holds it (until :meth:`refresh` or
        :meth:`close`).
        """
        return self._current().generation

    def refresh(self) -> bool:
        """Move to the index's newest committed generation, if a writer committed one.

        Cheap when nothing changed (one small file is read). Searches running meanwhile finish on
        the generation they started with; the previous generation is released (and a writer may
        delete it) once the last of them ends.

        Returns:
            Whether the index now holds a newer generation.

        Raises:
            IndexCorruptError: the new generation cannot be opened (the index keeps the old one).
        """
        from crossrank.search.snapshot import Snapshot
        from crossrank.store import current_generation_number

        with self._refresh_lock:
            old = self._current()
            number = current_generation_number(self.path)
            if number is None or number == old.number:
                return False
            new = Snapshot(self.path, device=self.device, nprobe=self._nprobe, reuse=old)
            with self._snap_lock:
                closed = self._snap is None  # close() ran meanwhile: stay closed
                if not closed:
                    self._snap = new
            if closed:
                new.close()
                return False
            self._retire(old)
            if new.manifest.encoder != old.manifest.encoder:  # rebuilt with --overwrite
                with self._lock:
                    self._encoder, self._rerankers = None, {}
            logger.debug(
                "index %s refreshed from generation %d to %d", self.path, old.number, new.number
            )
            return True

    def close(self) -> None:
        """Release the generation held (its pin, metadata connection and maps); idempotent.

        Searches running meanwhile finish first. Later calls raise :class:`CrossrankError`.
        """
        with self._snap_lock:
            snap, self._snap = self._snap, None
        if snap is not None:
            self._retire(snap)

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- changing the index ---------------------------------------------------------------------

    def add(
        self,
        source: str | Path,
        *,
        batch_size: int = 64,
        workers: int = 4,
        rehash: bool = False,
        retry_skipped: bool = False,
        progress: PhaseProgressFn | None = None,
    ) -> AddReport:
        """Index the files of ``source`` not in the index yet, then :meth:`refresh`.

        See :func:`crossrank.write.add_images`: files are compared by content, a moved file keeps
        its id, and the queries' encoder (:attr:`encoder`) encodes the new images; it is loaded
        only when there is something to encode. Files the index skipped before are tried again
        only with ``retry_skipped``.

        Raises:
            SourceError: the source is missing or unreadable.
            IndexLockedError: another process is writing the index.
        """
        from crossrank.write import add_images

        report = add_images(
            source,
            self.path,
            model=self._model_override,
            encoder=self._encoder,  # None until a search loaded it: add_images loads it if needed
            batch_size=batch_size,
            device=self.device,
            workers=workers,
            rehash=rehash,
            retry_skipped=retry_skipped,
            progress=progress,
        )
        self._after_write()
        return report

    def remove(
        self, ids: Sequence[int] | np.ndarray | None = None, *, where: str | None = None
    ) -> RemoveReport:
        """Remove images by id or by a ``where`` filter, then :meth:`refresh`.

        See :func:`crossrank.write.remove_images`.

        Raises:
            InvalidArgumentError: ids that were never in the index (named; nothing is removed).
            FilterError: a malformed ``where``.
            IndexLockedError: another process is writing the index.
        """
        from crossrank.write import remove_images

        report = remove_images(self.path, ids=ids, where=where)
        self._after_write()
        return report

    def compact(self, *, progress: PhaseProgressFn | None = None) -> CompactReport:
        """Rewrite the index without removed images, :meth:`refresh`, and delete old generations.

        See :func:`crossrank.write.compact_index`.

        Raises:
            IndexLockedError: another process is writing the index.
        """
        from crossrank.write import compact_index

        report = compact_index(self.path, progress=progress)
        self._after_write()
        return report

    def _after_write(self) -> None:
        """Refresh, then delete the generation this Index just let go (unless a writer is busy)."""
        from crossrank.errors import IndexLockedError

        if not self.refresh():
            return
        try:
            self._collect_garbage()
        except IndexLockedError:
            pass  # that writer collects after its own commit

    def _collect_garbage(self) -> None:
        """Delete the generations no reader pins.

        Raises:
            IndexLockedError: a writer holds the index (it collects after its own commit).
        """
        from crossrank.store import WriterLock, collect_garbage

        with WriterLock(self.path, create=False) as lock:
            collect_garbage(self.path, lock)

    # -- facts --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Images a search can return (removed images excluded)."""
        return len(self._current())

    def __repr__(self) -> str:
        return (
            f"Index({str(self.path)!r}, images={len(self)}, generation={self.manifest.generation})"
        )

    @property
    def model_id(self) -> str:
        """The model the index was built with."""
        return str(self.manifest.encoder["model_id"])

    @property
    def encoder(self) -> Encoder:
        """The query encoder, loaded on first use (checked against the index's model)."""
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    self._encoder = self._load_encoder()
        return self._encoder

    def _load_encoder(self) -> Encoder:
        """The query encoder: for a CLIP model, its text tower alone in plain torch (no
        transformers import: a cold search pays torch only); image queries and ``add`` load the
        full model through it on first use. Checked against the index's recorded model."""
        from crossrank.encoders import load_text_encoder
        from crossrank.encoders.config import VECTORS_ONLY_KEY

        built_with = self.manifest.encoder
        if built_with.get(VECTORS_ONLY_KEY):
            raise InvalidArgumentError(
                f"index {self.path} has no query encoder (it was built from arrays with "
                "encoder_info=, for vectors only), so it cannot encode a text or image query; "
                "search it with Index.search_vectors(xq), or build it with model= to rerank and "
                "search by text"
            )
        wanted = (
            self._model_override if self._model_override is not None else built_with["model_id"]
        )
        return load_text_encoder(
            wanted, device=self.device, expected_info=built_with, index_path=self.path
        )

    def info(self) -> dict[str, Any]:
        """A JSON-able description: counts, model, first stage, generation, sizes, and the
        reranker ``reranker="auto"`` uses (``default_reranker``).

        ``counts.images`` counts the images a search can return; ``tombstones`` the removed
        images still stored until a compaction. ``patch_codec`` says how the patches are stored
        (``fp16``, ``int8``, ``binary``, ``pq:16``...) and ``patch_bytes_per_image`` what one
        image's patches take on disk; ``patches.dtype`` is what the reranker gets (float16).
        """
        snap = self._current()
        manifest = snap.manifest
        gen_info = snap.generation.info
        return {
            "path": str(self.path.resolve()),
            "format_version": manifest.format_version,
            "generation": manifest.generation,
            "created_at": manifest.created_at,
            "updated_at": manifest.updated_at,
            "counts": dict(manifest.counts),
            "tombstones": int(snap.tombstones.size),
            "encoder": dict(manifest.encoder),
            "first_stage": {**manifest.first_stage, "ntotal": snap.first_stage.ntotal},
            "patches": {
                "n_patches": int(snap.patches.shape[0]),
                "dim": int(snap.patches.shape[1]),
                "dtype": "float16",
            },
            "patch_codec": gen_info.patch_codec,
            "patch_bytes_per_image": gen_info.patch_bytes_per_image,
            "metadata_columns": snap.metadata.columns,
            "default_reranker": self.default_reranker,
        }

    def metadata(
        self,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        *,
        filters: Filters | None = None,
    ) -> pa.Table:
        """The metadata table, optionally cut to ``columns`` and the rows matching ``where`` and
        the structured ``filters`` (see :meth:`search`).

        Raises:
            FilterError: malformed ``where`` or ``filters``, or an unknown column.
        """
        with self._use() as snap:
            if not snap.tombstones.size:
                return snap.metadata.table(
                    columns=list(columns) if columns else None, where=where, filters=filters
                )
            wanted = list(columns) if columns else list(snap.metadata.columns)
            table = snap.metadata.table(
                columns=wanted if "id" in wanted else ["id", *wanted], where=where, filters=filters
            )
            live = ~np.isin(table.column("id").to_numpy(), snap.tombstones)
            return table.filter(live).select(wanted)

    def skipped(self) -> pa.Table:
        """The files the build could not index, with ``path`` and ``reason``."""
        with self._use() as snap:
            return snap.metadata.skipped()

    def verify(self, *, full: bool = False) -> list[str]:
        """Check that FAISS, vectors, patch store and metadata agree; returns the problems found.

        With ``full``, every file is also hashed and compared with the checksum recorded at
        commit. See :func:`crossrank.api.verify.verify_index`, which also checks an index too
        damaged to open.
        """
        from crossrank.api.verify import verify_index

        return verify_index(self.path, full=full)

    # -- search -------------------------------------------------------------------------------

    def search(
        self,
        query: Query,
        k: int = 10,
        rerank_k: int = 100,
        where: str | None = None,
        reranker: str | Reranker | None = DEFAULT_RERANKER,
        fusion: str = "auto",
        *,
        filters: Filters | None = None,
        explain: bool = False,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Find the ``k`` images that best match ``query``.

        Args:
            query: a text (``str``), or an image for image-to-image search: a PIL image or a
                ``pathlib.Path`` to an image file. A ``str`` is always text.
            k: hits to return.
            rerank_k: first-stage candidates the reranker rescores (>= k).
            where: a DuckDB SQL boolean expression over the metadata columns, e.g.
                ``"width >= 512 AND path LIKE '%/2024/%'"``. Trusted input: it is run as SQL.
            filters: a structured filter, safe for untrusted input: ``{column: value | {op:
                value}}`` with ops ``eq ne lt le gt ge in contains``, e.g. ``{"width": {"ge": 512},
                "path": {"contains": "/2024/"}}``, checked against the metadata schema and run
                with parameters (see :mod:`crossrank.store.filters`). With ``where`` too, both
                must hold.
            reranker: ``"auto"`` (a trained reranker when one exists: the index's own
                ``reranker/`` folder, ``"blip-itm"`` on a BLIP index, the shipped reranker for the
                index's encoder; else none, the first stage alone, with a hint on how to train
                one in ``result.notes``; image queries get none), ``"maxsim"``, ``"blip-itm"``
                (BLIP indexes, text queries), ``"none"``/``None``, the folder of a trained
                cross-attention reranker, or a :class:`~crossrank.rerank.Reranker`. What ran is
                in ``result.reranker`` and ``result.fusion``.
            fusion: how the final score combines the two stages: ``auto`` (what the reranker
                recommends, else ``rerank``), ``rerank`` (the reranker's score alone), ``sum``, or
                ``weighted:ALPHA`` (``ALPHA * rerank + (1 - ALPHA) * first_stage``).
            explain: also say where each word of a text query looked in each returned hit
                (``hit.explain``, a :class:`~crossrank.hits.Explanation`: the query's tokens, the
                patch grid, one map per token). The cross-attention reranker gives its last
                layer's attention weights (heads averaged), MaxSim each token's best patch;
                without maps (no reranker, an image query, a reranker that cannot explain)
                ``result.notes`` says why. Scores and ranking are the same either way.
            nprobe: IVF lists probed for this search (default: the index's own, as opened); a
                filter raises it as the share of allowed images falls. Ignored by a Flat index.

        ``k`` and ``rerank_k`` may exceed the index size (the search never looks for more than
        the images it holds; ``counts.requested`` keeps what was asked). A text longer than the
        text encoder's positions is cut, with a
        :class:`~crossrank.search.encode.QueryTruncatedWarning` and a line in ``result.notes``.

        Returns:
            A :class:`SearchResult`: the hits, best first, with counts, per-stage timings, the
            encoder, the reranker and fusion that ranked them, and notes.

        Raises:
            InvalidArgumentError: ``k`` or ``rerank_k`` not a whole number from 1 to 2**63 - 1
                (a bool is refused), ``rerank_k < k``, an empty query, an image path that is
                missing, a folder or not an image.
            FilterError: a malformed ``where`` or ``filters``, or an unknown column.
        """
        return self.search_batch(
            [query],
            k=k,
            rerank_k=rerank_k,
            where=where,
            reranker=reranker,
            fusion=fusion,
            filters=filters,
            explain=explain,
            nprobe=nprobe,
        )[0]

    def search_batch(
        self,
        queries: Sequence[Query],
        k: int = 10,
        rerank_k: int = 100,
        where: str | None = None,
        reranker: str | Reranker | None = DEFAULT_RERANKER,
        fusion: str = "auto",
        *,
        filters: Filters | None = None,
        explain: bool = False,
        nprobe: int | None = None,
    ) -> list[SearchResult]:
        """Search many queries at once: one encoder pass per modality and one first-stage call.

        Arguments as :meth:`search`; the filter applies to every query. Returns one
        :class:`SearchResult` per query, in order. Every argument is checked before any model
        loads (see :meth:`check_search`).
        """
        from crossrank.encoders.describe import describe_model
        from crossrank.indexes.first_stage import check_nprobe
        from crossrank.rerank import resolve_fusion

        prepared, k, rerank_k = self._check_arguments(queries, k, rerank_k, fusion)
        nprobe = None if nprobe is None else check_nprobe(nprobe)
        if not prepared:
            return []
        with self._use() as snap:
            timings: dict[str, float] = {}
            allowed = allowed_ids(snap, where, filters, timings)  # DuckDB; no model yet
            size = len(snap)
            encoder_desc = describe_model(snap.manifest.encoder)
            results: list[SearchResult | None] = [None] * len(prepared)
            for positions, choice in self._plan(reranker, prepared):
                scorer = choice.scorer
                fuse = resolve_fusion(fusion, scorer)
                group = prepared if len(positions) == len(prepared) else prepared.subset(positions)
                g_timings = dict(timings)
                encoder = self.encoder  # loaded once, outside the timings (they time the query)
                with timed(g_timings, "encode"):
                    xq, q_tokens, q_masks, q_ids, labels, cut = encode_queries(
                        encoder,
                        snap.first_stage.d,
                        group,
                        token_embeddings=0 if scorer is None else scorer.token_embeddings,
                    )
                notes = {i: [n for n in (cut.get(i), choice.note) if n] for i in range(len(labels))}
                words = None
                if explain:
                    words = [
                        None if group.is_image(i) else token_strings(encoder, q_ids[i], q_masks[i])
                        for i in range(len(labels))
                    ]
                found = self._search_snapshot(
                    snap,
                    xq,
                    q_tokens,
                    q_masks,
                    labels,
                    k=cap_at(k, size),
                    n_candidates=cap_at(rerank_k if scorer is not None else k, size),
                    allowed=allowed,
                    scorer=scorer,
                    fuse=fuse,
                    timings=g_timings,
                    q_ids=q_ids,
                    requested=k,
                    encoder=encoder_desc,
                    reranker=choice.label,
                    fusion=str(fuse),
                    notes=notes,
                    words=words,
                    nprobe=nprobe,
                )
                for position, result in zip(positions, found, strict=True):
                    results[position] = result
        return [r for r in results if r is not None]

    def rerank(
        self,
        query: Query,
        ids: Sequence[int] | np.ndarray,
        k: int | None = None,
        reranker: str | Reranker | None = DEFAULT_RERANKER,
        fusion: str = "auto",
    ) -> SearchResult:
        """Rerank candidates another system chose (a backend's own first stage), best first.

        The candidates' stored patches are gathered and scored by the reranker exactly as a
        search scores its first-stage candidates (:func:`crossrank.search.pipeline.rerank`), then
        fused and joined with their metadata (:func:`crossrank.search.pipeline.join_metadata`).
        There is no first-stage score from the backend, so each candidate's
        ``first_stage_score`` is this index's own: the inner product of the query's pooled
        vector with the candidate's stored vector (what a Flat first stage returns; FAISS's IVF
        scores the same, a compressed factory such as ``IVF,PQ`` approximates it). Fusion then
        works as in :meth:`search`: with the same candidates, ``rerank(q, ids)`` gives the scores
        and order of ``search(q, rerank_k=len(ids))``.

        Args:
            query: a text, or an image (a PIL image or a ``pathlib.Path``), as in :meth:`search`.
            ids: the candidates' ids, each once, in any order; empty gives an empty result (no
                model loads).
            k: hits to return (default: every candidate).
            reranker: as in :meth:`search` (``"auto"``: a trained reranker when one exists, else
                the candidates are ordered by the first-stage score alone, with a note).
            fusion: as in :meth:`search`.

        Returns:
            A :class:`SearchResult` with ``counts.candidates == len(ids)``, ``timings_ms`` (encode,
            first_stage: the stored vectors' scores, rerank, metadata, total), and ``reranker``,
            ``fusion`` and ``encoder`` as a search fills them.

        Raises:
            InvalidArgumentError: an empty query, an image path that is missing, ids that are
                not whole numbers, appear twice, or are not in the index (never were, or were
                removed: named), a bad ``k`` or fusion, or an index with no query encoder.
        """
        from crossrank.encoders.describe import describe_model
        from crossrank.hits import SearchCounts
        from crossrank.rerank import resolve_fusion

        prepared, _, _ = self._check_arguments([query], 1, 1, fusion)
        cand = _candidate_ids(ids)
        if k is not None:
            k, _ = check_k(k, k)
        with self._use() as snap:
            self._check_rerank_ids(snap, cand)
            requested = cand.size if k is None else k
            encoder_desc = describe_model(snap.manifest.encoder)
            timings: dict[str, float] = {}
            if not cand.size:
                return SearchResult(
                    query=prepared.labels[0],
                    hits=(),
                    counts=SearchCounts(requested=0, returned=0, filtered_out=0, candidates=0),
                    timings_ms={"total": 0.0},
                    generation=snap.number,
                    encoder=encoder_desc,
                )
            ((_, choice),) = self._plan(reranker, prepared)
            scorer = choice.scorer
            fuse = resolve_fusion(fusion, scorer)
            encoder = self.encoder  # loaded once, outside the timings (they time the query)
            with timed(timings, "encode"):
                query_features = encode_queries(
                    encoder,
                    snap.first_stage.d,
                    prepared,
                    token_embeddings=0 if scorer is None else scorer.token_embeddings,
                )
            with timed(timings, "first_stage"):
                first = self._stored_scores(snap, cand, query_features[0][0])
                # Candidates in first-stage order, as a search hands them on: reranker ties keep it.
                by_first = np.argsort(-first, kind="stable")
                cand, first = cand[by_first], first[by_first].astype(np.float32, copy=False)
            return self._rank_given(
                snap,
                cand,
                first,
                query_features,
                requested=requested,
                choice=choice,
                fuse=fuse,
                encoder_desc=encoder_desc,
                timings=timings,
            )

    # -- what Index.rerank does per index kind (a sharded index asks its shards) ------------------

    def _check_rerank_ids(self, snap: Snapshot, cand: np.ndarray) -> None:
        """Refuse candidates the index does not hold (never added, or removed), naming them."""
        _check_live(snap, cand, self.path)

    def _stored_scores(self, snap: Snapshot, cand: np.ndarray, xq: np.ndarray) -> np.ndarray:
        """The first-stage score of each candidate: its stored vector . the query vector."""
        rows = snap.generation.rows_of_ids(cand)
        return np.asarray(snap.vectors[rows], dtype=np.float32) @ xq

    def _rank_given(
        self,
        snap: Snapshot,
        cand: np.ndarray,
        first: np.ndarray,
        query_features: tuple,
        *,
        requested: int,
        choice: Any,
        fuse: Any,
        encoder_desc: Any,
        timings: dict[str, float],
    ) -> SearchResult:
        """Rerank, fuse and join candidates given in first-stage order: the result of rerank."""
        from crossrank.search.pipeline import query_result, rank

        _, q_tokens, q_masks, q_ids, labels, cut = query_features
        scorer = choice.scorer
        hits, _ = rank(
            snap,
            cand,
            first,
            k=requested,
            scorer=scorer,
            fuse=fuse,
            tokens=q_tokens[0],
            mask=q_masks[0],
            input_ids=q_ids[0],
            timings=timings,
        )
        return query_result(
            labels[0],
            hits,
            requested=requested,
            filtered_out=0,
            candidates=int(cand.size),
            timings=timings,
            generation=snap.number,
            encoder=encoder_desc,
            reranker=choice.label if scorer is not None else "none",
            fusion=str(fuse) if scorer is not None else "none",
            notes=tuple(n for n in (cut.get(0), choice.note) if n),
        )

    def check_search(
        self,
        queries: Sequence[Query] = (),
        k: int = 10,
        rerank_k: int = 100,
        where: str | None = None,
        fusion: str = "auto",
        *,
        filters: Filters | None = None,
    ) -> None:
        """Check search arguments without searching and without loading any model.

        What :meth:`search_batch` checks first: the queries (an image path must exist, be a file
        and decode), ``k`` and ``rerank_k``, the fusion spec, and ``where`` / ``filters``
        against the metadata schema (DuckDB binds the expression and scans nothing, so a value it
        cannot cast is only caught by the search). The command line runs it before it loads the
        encoder, so that a typo in ``--where`` fails at once.

        Raises:
            InvalidArgumentError: a bad query, ``k``, ``rerank_k`` or fusion.
            FilterError: a malformed ``where`` or ``filters``, or an unknown column.
        """
        self._check_arguments(list(queries), k, rerank_k, fusion)
        with self._use() as snap:
            if where is not None:
                snap.metadata.check_where(where)
            if filters is not None:
                snap.metadata.check_filters(filters)

    def _check_arguments(
        self, queries: Sequence[Query], k: int, rerank_k: int, fusion: str
    ) -> tuple[PreparedQueries, int, int]:
        from crossrank.rerank import resolve_fusion

        if isinstance(queries, (str, Path)) or not isinstance(queries, Sequence):
            raise InvalidArgumentError(
                "queries must be a list of queries; use search() for one query"
            )
        k, rerank_k = check_k(k, rerank_k)
        resolve_fusion(fusion)  # a bad spec fails before any model loads
        return prepare_queries(queries), k, rerank_k

    def search_vectors(
        self,
        xq: np.ndarray,
        k: int = 10,
        where: str | None = None,
        *,
        filters: Filters | None = None,
        nprobe: int | None = None,
    ) -> list[SearchResult]:
        """Search with query vectors encoded beforehand: the first stage only, no reranking.

        Runs what :meth:`search_batch` runs after encoding (the ``where`` filter, the first stage
        or exact scoring of a small allowed set, the metadata join, the hits) on pooled vectors
        the caller already has: embeddings computed elsewhere with the index's model, or a
        benchmark that must not re-encode its query every time. No encoder is loaded. Reranking
        needs the query's token features: use :meth:`search` for it.

        Args:
            xq: float ``(m, d)`` L2-normalised query vectors from the index's model (one query:
                ``xq[None, :]``); coerced to float32.
            k: hits to return per query.
            where: a DuckDB SQL boolean expression over the metadata columns, as in :meth:`search`.
            filters: a structured filter, as in :meth:`search`.
            nprobe: IVF lists probed for this search, as in :meth:`search`.

        Returns:
            One :class:`SearchResult` per row of ``xq``, in order. Its ``query`` is
            ``"<vector i>"``; each hit's ``score`` is its first-stage score, ``rerank_score`` None.

        Raises:
            InvalidArgumentError: ``k <= 0``, or ``xq`` is not a finite float ``(m, d)`` matrix of
                the index's dim.
            FilterError: a malformed ``where`` or an unknown column.

        Example:
            >>> xq = index.encoder.encode_text(["a red bicycle"]).pooled  # doctest: +SKIP
            >>> [hit.path for hit in index.search_vectors(xq, k=5)[0]]  # doctest: +SKIP
        """
        from crossrank.indexes.first_stage import check_nprobe

        k, _ = check_k(k, k)
        xq = self._check_xq(xq)
        nprobe = None if nprobe is None else check_nprobe(nprobe)
        labels = [f"<vector {i}>" for i in range(xq.shape[0])]
        return self._search_encoded(
            xq,
            None,
            None,
            labels,
            k=k,
            n_candidates=k,
            where=where,
            scorer=None,
            fuse=None,
            timings={},
            filters=filters,
            nprobe=nprobe,
        )

    def _check_xq(self, xq: np.ndarray) -> np.ndarray:
        """``xq`` as a C-contiguous finite float32 ``(m, d)`` matrix, ``d`` the index's dim."""
        from crossrank.indexes._checks import as_vectors

        d = self.first_stage.d
        model = self.manifest.encoder.get("model_id", "another model")
        return as_vectors(
            xq,
            "xq",
            d,
            expected=f"index {self.path} was built with dim {d} by {model}",
            hint="encode queries with the same model",
        )

    def _search_encoded(
        self,
        xq: np.ndarray,
        q_tokens: list[np.ndarray] | None,
        q_masks: list[np.ndarray] | None,
        labels: list[str],
        *,
        k: int,
        n_candidates: int,
        where: str | None,
        scorer: Reranker | None,
        fuse: Any,
        timings: dict[str, float],
        q_ids: list[np.ndarray | None] | None = None,
        filters: Filters | None = None,
        nprobe: int | None = None,
    ) -> list[SearchResult]:
        """Filter, first stage, rerank (when ``scorer``), fuse, join metadata: encoded queries.

        ``xq`` is ``(m, d)`` float32; ``q_tokens`` and ``q_masks`` hold each query's token
        features and mask, and ``q_ids`` its token ids (None for an image query); they are read
        only when ``scorer`` is given (the ids only by a scorer with ``needs_input_ids``). Every
        stage reads the one generation held when the call starts.
        """
        from crossrank.encoders.describe import describe_model

        with self._use() as snap:
            allowed = allowed_ids(snap, where, filters, timings)
            size = len(snap)
            return self._search_snapshot(
                snap,
                xq,
                q_tokens,
                q_masks,
                labels,
                k=cap_at(k, size),
                n_candidates=cap_at(n_candidates, size),
                allowed=allowed,
                scorer=scorer,
                fuse=fuse,
                timings=timings,
                q_ids=q_ids,
                requested=k,
                encoder=describe_model(snap.manifest.encoder),
                nprobe=nprobe,
            )

    def _reranker(self, spec: str | Reranker | None) -> Reranker | None:
        """The reranker ``spec`` names (loaded once per spec)."""
        return self._choose(spec).scorer

    def _choose(self, spec: str | Reranker | None) -> _Choice:
        """What ``spec`` reranks with, its label for the results and the note said with it."""
        from crossrank.rerank import get_reranker

        if spec is None or not isinstance(spec, (str, os.PathLike)):
            scorer = get_reranker(spec, device=self.device, precision=self.precision)
            return _Choice(scorer, "none" if scorer is None else str(scorer.name), None)
        key = str(spec)
        if key not in self._rerankers:
            with self._lock:
                if key not in self._rerankers:
                    self._rerankers[key] = self._load_choice(key, spec)
        return self._rerankers[key]

    def _load_choice(self, key: str, spec: str | os.PathLike[str]) -> _Choice:
        from crossrank.rerank import get_reranker
        from crossrank.rerank.base import RerankerName

        auto = key == AUTO_RERANKER
        resolved: str | Path = self.default_reranker if auto else key
        if isinstance(spec, os.PathLike):
            resolved = Path(spec)
        scorer = get_reranker(
            resolved,
            device=self.device,
            encoder_info=self.manifest.encoder,
            precision=self.precision,
        )
        note = None
        if scorer is None:
            label = "none"
            if auto:
                note = self._train_hint()
                logger.info("%s", note)  # once per Index: the choice is cached
        elif auto:
            label = self._auto_label(str(resolved))
        elif isinstance(resolved, str) and resolved.strip().lower() in set(RerankerName):
            label = resolved.strip().lower()
        else:  # a folder
            label = f"{scorer.name} ({resolved})"
        if scorer is not None and self.precision != Precision.AUTO and scorer.name != "maxsim":
            label = f"{label}, {self.precision}"  # MaxSim computes in float32 at any precision
        return _Choice(scorer, label, note, auto=auto)

    def _plan(
        self, spec: str | Reranker | None, prepared: PreparedQueries
    ) -> list[tuple[list[int], _Choice]]:
        """The queries' positions grouped by the reranker each gets.

        Under ``auto`` an image query gets none: the rerankers ``auto`` finds were trained on
        text queries (a cross-attention checkpoint) or read text only (``blip-itm``), and over
        image queries they made rankings worse. A reranker named explicitly reranks every query.
        """
        choice = self._choose(spec)
        everyone = list(range(len(prepared)))
        if not (choice.auto and choice.scorer is not None and prepared.images):
            return [(everyone, choice)]
        images = [i for i, _ in prepared.images]
        texts = [i for i, _ in prepared.texts]
        image_choice = _Choice(
            None,
            "none",
            f"image queries are not reranked by default: the {choice.label} reranker reads text "
            "queries; pass --reranker maxsim (or a reranker folder) to rerank them",
        )
        return [(group, c) for group, c in ((texts, choice), (images, image_choice)) if group]

    def _auto_label(self, resolved: str) -> str:
        if resolved in ("none", "blip-itm", "maxsim"):
            return resolved
        if Path(resolved) == self.path / RERANKER_DIR:
            return f"cross-attention (index {RERANKER_DIR}/)"
        return f"cross-attention (shipped for {self.model_id})"

    def _train_hint(self) -> str:
        return (
            f"no trained reranker for {self.model_id}, so the first stage ranked alone; to "
            f"rerank, train one: crossrank train PAIRS --index {self.path} --out "
            f"{self.path / RERANKER_DIR} (see docs/training.md)"
        )

    @property
    def default_reranker(self) -> str:
        """What ``reranker="auto"`` uses: a trained reranker when one exists, else ``"none"``.

        In order: the index's own ``reranker/`` folder; ``blip-itm`` for an index built with
        BLIP; the shipped reranker trained over this index's encoder (the demo reranker for the
        demo encoder); else ``"none"``, the first stage alone. MaxSim is never chosen by
        ``auto``: over an encoder trained only through pooled vectors it made rankings worse
        (docs/rerankers.md); ask for it by name.
        """
        from crossrank.rerank.checkpoint import shipped_reranker_for

        own = self.path / RERANKER_DIR
        if (own / "config.json").is_file():
            return str(own)
        if self.manifest.encoder.get("model_type") == "blip":
            return "blip-itm"
        shipped = shipped_reranker_for(self.manifest.encoder)
        return str(shipped) if shipped is not None else "none"


def _candidate_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``ids`` as a 1-d int64 array of whole numbers, each once (one line otherwise)."""
    if isinstance(ids, (str, bytes)):
        raise InvalidArgumentError(f"ids must be a list of integer ids, got {ids!r}")
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"ids must be a 1-d list of integer ids, got {arr.dtype} of shape {arr.shape}"
        )
    arr = arr.astype(np.int64, copy=False)
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        dupes = ", ".join(str(i) for i in uniq[counts > 1][:10])
        raise InvalidArgumentError(f"ids must each appear once, but these repeat: {dupes}")
    return arr


def _check_live(snap: Snapshot, ids: np.ndarray, path: Path) -> None:
    """Refuse, naming them, ids the generation never held or holds only as removed."""
    if not ids.size:
        return
    table = np.asarray(snap.ids)
    known = np.isin(ids, table)
    removed = np.isin(ids, snap.tombstones) if snap.tombstones.size else np.zeros_like(known)
    bad = ids[~known | removed]
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:10]) + (
            f" and {bad.size - 10} more" if bad.size > 10 else ""
        )
        raise InvalidArgumentError(
            f"{bad.size} id(s) not in index {path} (never added, or removed): {shown}; "
            "rerank only ids the index holds (refresh the backend's view of it)"
        )


@dataclass(frozen=True)
class _Choice:
    """A resolved ``reranker`` argument: the scorer (None: the first stage alone), its label in
    the results, a note to show with them, and whether ``auto`` chose it."""

    scorer: Reranker | None
    label: str
    note: str | None
    auto: bool = False

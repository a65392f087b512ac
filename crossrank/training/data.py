"""What reranker training samples from, prepared once and held in memory (private).

:func:`prepare_training_set` turns a pairs file and an index into a :class:`TrainingSet`:

- the unique captions, encoded ONCE by the index's (frozen) text encoder: token features as a
  float16 bank ``(U, L, d)`` with a mask, and pooled vectors for one batched first-stage search;
- the patch features of every image training can touch (the pairs' images and the mined
  candidates), gathered ONCE from the patch store into a float16 bank ``(N, P, d)``;
- which images are positives of which caption (:class:`PositiveSet`): exact scene-graph relevance
  when the pairs file sits in a shapes dataset, else every image paired with the identical caption;
- the hard negatives of each caption: its first-stage top ``mine_k`` minus its positives;
- a fixed validation split of the unique captions, with the first-stage lists to rerank.

Images are addressed by their *local* position in the banks (``0 .. N-1``); ``pool_rows`` maps a
local position back to the index row. :class:`CandidateSampler` draws each step's candidate lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.datasets.negatives import CaptionNegativeBank, perturbation_rows
from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    from crossrank.api.index import Index
    from crossrank.training.config import RerankTrainConfig

__all__ = [
    "CandidateSampler",
    "CaptionNegativeBank",
    "PositiveSet",
    "TrainingSet",
    "prepare_training_set",
    "read_pairs",
]

logger = logging.getLogger(__name__)

_PAIRS_HINT = (
    "a pairs file is a .parquet or .csv file with a `path` column (the image, relative "
    "to the file's folder or absolute) and a `caption` column"
)
_ENCODE_CHUNK = 1024  # captions per encode_text call: bounds the float32 token features in flight
_GATHER_CHUNK = 4096  # patch rows per gather call
_MATCH_ELEMENTS = 1 << 24  # (captions x images) booleans per match_matrix call


# -- pairs file -------------------------------------------------------------------------------


def read_pairs(path: str | os.PathLike[str]) -> tuple[list[str | None], list[str | None]]:
    """Read a pairs file: each row's image path (absolute, resolved) and caption.

    Args:
        path: a ``.parquet`` or ``.csv`` file with ``path`` and ``caption`` columns; relative
            paths resolve against the file's folder.

    Returns:
        ``(paths, captions)``, one entry per row; None where the cell is empty (``path``) or null.

    Raises:
        InvalidArgumentError: the file is missing, not .parquet/.csv, unreadable, has no rows, or
            lacks the ``path`` or ``caption`` column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    file = Path(path)
    if not file.is_file():
        raise InvalidArgumentError(f"pairs file {file} does not exist; {_PAIRS_HINT}")
    suffix = file.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise InvalidArgumentError(
            f"pairs file {file} has suffix {suffix or '(none)'!r}; {_PAIRS_HINT}"
        )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(file)
        else:
            import pyarrow.csv as pcsv

            # Both stay strings even when every value looks like a number ("0001").
            table = pcsv.read_csv(
                file,
                convert_options=pcsv.ConvertOptions(
                    column_types={"path": pa.string(), "caption": pa.string()}
                ),
            )
    except (pa.ArrowException, OSError, ValueError) as e:
        detail = " ".join(str(e).split())[:200]
        raise InvalidArgumentError(
            f"cannot read pairs file {file} ({detail}); {_PAIRS_HINT}"
        ) from e
    missing = [c for c in ("path", "caption") if c not in table.column_names]
    if missing:
        raise InvalidArgumentError(
            f"pairs file {file} has no {' or '.join(f'`{c}`' for c in missing)} column (columns: "
            f"{', '.join(table.column_names) or 'none'}); {_PAIRS_HINT}"
        )
    if table.num_rows == 0:
        raise InvalidArgumentError(f"pairs file {file} has no rows; {_PAIRS_HINT}")
    columns = {}
    for name in ("path", "caption"):
        try:
            columns[name] = pc.cast(table.column(name), pa.string()).to_pylist()
        except pa.ArrowException as e:
            raise InvalidArgumentError(
                f"pairs file {file}: the `{name}` column must hold text, got "
                f"{table.column(name).type}"
            ) from e
    base = file.parent.absolute()
    paths = [
        os.path.abspath(os.path.join(base, p)) if p is not None and p.strip() else None
        for p in columns["path"]
    ]
    return paths, columns["caption"]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shapes_root(pairs_path: Path) -> Path | None:
    """The pairs file's folder when it is a shapes dataset (``dataset.json`` names "shapes")."""
    info = pairs_path.parent / "dataset.json"
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return pairs_path.parent if isinstance(data, dict) and data.get("name") == "shapes" else None


# -- positives --------------------------------------------------------------------------------


class PositiveSet:
    """Which local images are true matches of which caption, as sorted ``u * N + c`` keys.

    Sparse on purpose: a shapes caption such as "a red circle" is true of a few percent of the
    images, so a dense ``(U, N)`` matrix would cost U * N bytes for a few set bits.
    """

    def __init__(self, caption: np.ndarray, image: np.ndarray, n_images: int) -> None:
        self.n_images = int(n_images)
        self.keys = np.unique(caption.astype(np.int64) * self.n_images + image.astype(np.int64))

    def contains(self, caption: np.ndarray | int, image: np.ndarray | int) -> np.ndarray:
        """Bool, broadcast over ``caption`` and ``image``: is ``image`` a true match of it."""
        keys = np.asarray(caption, dtype=np.int64) * self.n_images + np.asarray(image, np.int64)
        at = np.searchsorted(self.keys, keys)
        found = at < self.keys.size
        found[found] = self.keys[at[found]] == keys[found]
        return found

    def count(self, n_captions: int, images: np.ndarray | None = None) -> np.ndarray:
        """Positives per caption ``(n_captions,)``, among ``images`` (bool ``(N,)``) if given."""
        caption, image = np.divmod(self.keys, self.n_images)
        if images is not None:
            caption = caption[images[image]]
        return np.bincount(caption, minlength=n_captions)


# -- the training set -------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Everything a training step or an evaluation reads, in memory.

    Attributes:
        captions: the U unique usable captions.
        tokens: float16 ``(U, L, d)`` token features (zero at padding).
        token_mask: bool ``(U, L)``, True = a real token.
        patches: float16 ``(N, P, d)`` patch features of the local images.
        pool_rows: int64 ``(N,)`` index row of each local image.
        positives: the :class:`PositiveSet` over ``(U, N)``.
        relevance: ``"shapes"`` (exact, scene graph) or ``"caption"`` (identical caption).
        random_pool: int64 local images random negatives are drawn from (the pairs' images).
        hard: int64 ``(U, mine_k)`` mined negatives per caption, first-stage order, -1 padded.
        hard_count: int64 ``(U,)`` valid entries of each row of ``hard``.
        train_caption, train_image: int64 ``(T,)`` the training pairs (caption, local image).
        val_captions: int64 ``(V,)`` held-out captions; ``val_image`` ``(V,)`` a positive of each.
        val_first_stage: int64 ``(V, mine_k)`` their first-stage top ``mine_k``, -1 padded;
            ``val_relevant`` bool ``(V, mine_k)``: which of those are true matches.
        query_vectors: float32 ``(U, D)`` the captions' pooled (first-stage) vectors.
            With caption negatives, ``tokens``, ``token_mask`` and ``query_vectors`` hold the
            U captions first, then the negative captions (see :class:`CaptionNegativeBank`).
        image_vectors: float32 ``(N, D)`` the local images' pooled vectors, so that
            ``query_vectors @ image_vectors.T`` is the first-stage score.
        counts: pair and caption counts for the report.
        fingerprint: what identifies the data (pairs file hash, index generation and encoder).
        negatives: the rewritten captions of each caption (``caption_negatives > 0``), else None.
        object_tokens: int64 ``(rows, 2)`` per caption bank row, the token position of the word
            naming each object (-1: none), for attention supervision; None without it.
        relation_negatives: ``negatives`` cut to each relation caption's rewrites that keep both
            objects (:meth:`CaptionNegativeBank.relation_only`), for ``relation_share``; None
            without caption negatives.
    """

    captions: list[str]
    tokens: np.ndarray
    token_mask: np.ndarray
    patches: np.ndarray
    pool_rows: np.ndarray
    positives: PositiveSet
    relevance: str
    random_pool: np.ndarray
    hard: np.ndarray
    hard_count: np.ndarray
    train_caption: np.ndarray
    train_image: np.ndarray
    val_captions: np.ndarray
    val_image: np.ndarray
    val_first_stage: np.ndarray
    val_relevant: np.ndarray
    query_vectors: np.ndarray
    image_vectors: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    negatives: CaptionNegativeBank | None = None
    object_tokens: np.ndarray | None = None
    relation_negatives: CaptionNegativeBank | None = None


def prepare_training_set(
    index: Index,
    pairs_path: str | os.PathLike[str],
    config: RerankTrainConfig,
    *,
    token_embeddings: bool = False,
) -> TrainingSet:
    """Read the pairs, match them to the index, encode, mine and split (see the module docstring).

    With ``token_embeddings`` the caption bank's token features carry the text encoder's layer-0
    states in front (``TextFeatures.reranker_tokens()``), for a reranker that reads them.

    Raises:
        InvalidArgumentError: the pairs file is bad (see :func:`read_pairs`), no pair is usable,
            or a caption of a shapes dataset is not one of its templates.
    """
    pairs_file = Path(pairs_path)
    raw_paths, raw_captions = read_pairs(pairs_file)
    n_pairs = len(raw_paths)

    # -- match the pairs to index rows ---------------------------------------------------------
    meta = index.metadata(columns=["id", "path"])
    row_of_path = dict(
        zip(
            meta.column("path").to_pylist(),
            index.stored.rows_of_ids(meta.column("id").to_numpy()).tolist(),
            strict=True,
        )
    )
    empty = np.array([c is None or not c.strip() for c in raw_captions])
    pair_row = np.array(
        [row_of_path.get(p, -1) if p is not None else -1 for p in raw_paths], dtype=np.int64
    )
    # Exact relevance from a shapes dataset's scene graphs, when the pairs file sits in one.
    shapes_root = _shapes_root(pairs_file)
    scene_row_of_index_row: np.ndarray | None = None
    if shapes_root is not None:
        scene_row_of_index_row, scenes = _shapes_scenes(shapes_root, row_of_path, len(index))
        # An image outside the dataset has no scene graph, so no exact relevance: skip it too.
        pair_row = np.where((pair_row >= 0) & (scene_row_of_index_row[pair_row] >= 0), pair_row, -1)
    missing = (pair_row < 0) & ~empty
    usable = (pair_row >= 0) & ~empty
    if missing.any():
        example = raw_paths[int(np.flatnonzero(missing)[0])]
        where = f"index {index.path}" + (" or the shapes dataset" if shapes_root else "")
        logger.warning(
            "%d of %d pairs name an image that is not in %s (e.g. %s): skipped",
            int(missing.sum()),
            n_pairs,
            where,
            example,
        )
    if empty.any():
        logger.warning("%d of %d pairs have an empty caption: skipped", int(empty.sum()), n_pairs)
    if not usable.any():
        example = next((p for p in raw_paths if p is not None), None)
        indexed = meta.column("path")[0].as_py() if meta.num_rows else None
        raise InvalidArgumentError(
            f"no usable pair in {pairs_file}: of {n_pairs} pairs, {int(missing.sum())} name an "
            f"image not in index {index.path} (e.g. {example}; the index holds e.g. {indexed}) and "
            f"{int(empty.sum())} have an empty caption; build the index over the pairs' images"
        )
    captions_all = [raw_captions[i] for i in np.flatnonzero(usable)]
    unique, pair_caption = np.unique(np.array(captions_all, dtype=object), return_inverse=True)
    captions = [str(c) for c in unique]
    pair_caption = pair_caption.astype(np.int64)
    pair_row = pair_row[usable]
    n_captions = len(captions)

    # -- encode every caption (and rewritten caption) once; mine the first stage ---------------
    if config.caption_negatives and shapes_root is None:
        raise InvalidArgumentError(
            f"caption negatives need the scene graphs of a shapes dataset to tell which "
            f"rewritten captions are false, but {pairs_file} is not in one (no dataset.json "
            "naming 'shapes' beside it); train without --caption-negatives"
        )
    # The captions of a shapes dataset are templates, parsed once: for exact relevance and for
    # their rewrites, which follow the captions in the bank.
    caption_specs = _parse_shapes_captions(captions, shapes_root) if shapes_root else None
    perturb = perturbation_rows(captions, caption_specs) if config.caption_negatives else None
    extra_specs = perturb[2] if perturb is not None else []
    bank_texts = captions + [spec.text for spec in extra_specs]
    tokens, token_mask, xq = _encode_captions(index, bank_texts, token_embeddings)
    depth = min(config.mine_k, len(index))
    _, ids = index.first_stage.search(xq[:n_captions], depth)  # (U, depth) ids, -1 padded
    mined_rows = np.full(ids.shape, -1, dtype=np.int64)
    valid = ids >= 0
    mined_rows[valid] = index.stored.rows_of_ids(ids[valid])
    if scene_row_of_index_row is not None:  # an image without a scene graph is never a candidate
        mined_rows[valid] = np.where(
            scene_row_of_index_row[mined_rows[valid]] >= 0, mined_rows[valid], -1
        )

    # -- the local image pool and its patch bank ----------------------------------------------
    pool_rows = np.unique(np.concatenate([pair_row, mined_rows[mined_rows >= 0]]))
    n_images = int(pool_rows.size)
    pair_image = np.searchsorted(pool_rows, pair_row)
    mined = np.where(mined_rows >= 0, np.searchsorted(pool_rows, mined_rows), -1)
    patches = _gather_patches(index, pool_rows)

    if scene_row_of_index_row is None:
        relevance = "caption"
        positives = PositiveSet(pair_caption, pair_image, n_images)
    else:
        relevance = "shapes"
        from crossrank.datasets import SpecArrays

        pool_scenes = scenes.take(scene_row_of_index_row[pool_rows])
        bank_specs = SpecArrays.from_specs(caption_specs + extra_specs)
        positives = _shapes_positives(
            bank_specs.take(np.arange(n_captions)), pool_scenes, pair_caption, pair_image
        )

    # -- hard negatives: the mined candidates that are not positives ---------------------------
    is_pos = positives.contains(np.arange(n_captions)[:, None], np.maximum(mined, 0))  # (U, depth)
    keep = (mined >= 0) & ~is_pos
    order = np.argsort(~keep, axis=1, kind="stable")  # kept first, first-stage order kept
    hard = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(mined, order, 1), -1)
    hard_count = keep.sum(axis=1).astype(np.int64)

    # A caption true of every image it could be contrasted with teaches nothing: drop its pairs.
    random_pool = np.unique(pair_image)
    in_pool = np.zeros(n_images, dtype=bool)
    in_pool[random_pool] = True
    n_negatives = (random_pool.size - positives.count(n_captions, in_pool)) + hard_count
    no_negative = n_negatives[pair_caption] == 0
    if no_negative.all():
        raise InvalidArgumentError(
            f"no usable pair in {pairs_file}: each caption is true of every image it could be "
            "contrasted with; a reranker needs images that do not match a caption"
        )

    # -- a fixed validation split of the unique captions ---------------------------------------
    candidates = np.flatnonzero(n_negatives > 0)
    n_val = 0
    if config.val_fraction > 0 and candidates.size > 1:
        n_val = min(
            config.max_val_captions,
            candidates.size - 1,
            max(1, round(config.val_fraction * candidates.size)),
        )
    split_rng = np.random.default_rng([config.seed, 1])
    val_captions = np.sort(split_rng.choice(candidates, size=n_val, replace=False))
    is_val = np.zeros(n_captions, dtype=bool)
    is_val[val_captions] = True
    train = ~is_val[pair_caption] & ~no_negative
    _, first_pair = np.unique(pair_caption, return_index=True)  # (U,) each caption's first pair
    val_image = pair_image[first_pair[val_captions]]
    val_first_stage = mined[val_captions]
    val_relevant = (val_first_stage >= 0) & positives.contains(
        val_captions[:, None], np.maximum(val_first_stage, 0)
    )

    counts = {
        "pairs": n_pairs,
        "used_pairs": int(train.sum()),
        "val_pairs": int(is_val[pair_caption].sum()),
        "missing_image": int(missing.sum()),
        "empty_caption": int(empty.sum()),
        "no_negative": int(no_negative.sum()),
        "captions": n_captions,
        "train_captions": int(np.unique(pair_caption[train]).size),
        "val_captions": int(n_val),
        "images": n_images,
    }
    fingerprint = {
        "pairs_sha256": _file_sha256(pairs_file),
        "index_generation": int(index.manifest.generation),
        "index_images": len(index),
        "encoder": index.manifest.encoder.get("weights_sha256") or index.model_id,
        "relevance": relevance,
    }
    negatives = relation_negatives = None
    if perturb is not None:
        offsets, n_structural, _ = perturb
        negatives = CaptionNegativeBank(
            offsets=offsets, n_structural=n_structural, specs=bank_specs, scenes=pool_scenes
        )
        relation_negatives = negatives.relation_only(caption_specs + extra_specs)
        counts["negative_captions"] = len(extra_specs)
    object_tokens = None
    if perturb is not None and config.attention_supervision:
        from crossrank.training.attention_targets import object_token_positions

        encoder = index.encoder
        object_tokens = object_token_positions(encoder.tokenizer, bank_texts, encoder.max_text_len)
    logger.info(
        "training set: %d pairs (%d train, %d val captions), %d images, relevance %s",
        counts["used_pairs"],
        counts["train_captions"],
        n_val,
        n_images,
        relevance,
    )
    return TrainingSet(
        captions=captions,
        tokens=tokens,
        token_mask=token_mask,
        patches=patches,
        pool_rows=pool_rows,
        positives=positives,
        relevance=relevance,
        random_pool=random_pool,
        hard=hard,
        hard_count=hard_count,
        train_caption=pair_caption[train],
        train_image=pair_image[train],
        val_captions=val_captions,
        val_image=val_image,
        val_first_stage=val_first_stage,
        val_relevant=val_relevant,
        query_vectors=xq,
        image_vectors=np.ascontiguousarray(index.stored.vectors()[pool_rows], dtype=np.float32),
        counts=counts,
        fingerprint=fingerprint,
        negatives=negatives,
        object_tokens=object_tokens,
        relation_negatives=relation_negatives,
    )


def _shapes_scenes(root: Path, row_of_path: dict[str, int], n_rows: int) -> tuple[np.ndarray, Any]:
    """The dataset's scene arrays and, per index row, its scene's row (-1: no scene graph)."""
    import pyarrow.parquet as pq

    from crossrank.datasets import open_shapes

    dataset = open_shapes(root)
    paths = pq.read_table(dataset.metadata_path, columns=["path"]).column("path").to_pylist()
    scene_row = np.full(n_rows, -1, dtype=np.int64)
    for i, rel in enumerate(paths):
        row = row_of_path.get(os.path.abspath(root.absolute() / rel))
        if row is not None:
            scene_row[row] = i
    return scene_row, dataset.scene_arrays()


def _parse_shapes_captions(captions: list[str], root: Path) -> list[Any]:
    """The :class:`~crossrank.datasets.QuerySpec` of each caption of a shapes dataset's pairs.

    Raises:
        InvalidArgumentError: a caption is not a shapes template.
    """
    from crossrank.datasets import parse_query

    try:
        return [parse_query(c) for c in captions]
    except (ValueError, KeyError) as e:
        raise InvalidArgumentError(
            f"the pairs file sits in shapes dataset {root}, so its captions must be shapes "
            f"templates, but one is not ({' '.join(str(e).split())}); move a custom pairs file "
            "out of the dataset folder to train on identical-caption positives"
        ) from e


def _shapes_positives(
    specs: Any, scenes: Any, pair_caption: np.ndarray, pair_image: np.ndarray
) -> PositiveSet:
    """Every (caption, image) whose scene satisfies the caption (``specs``: the captions'
    SpecArrays), plus the pairs themselves."""
    from crossrank.datasets import match_matrix

    n_images = len(scenes)
    step = max(1, _MATCH_ELEMENTS // max(1, n_images))
    cap_parts, img_parts = [pair_caption], [pair_image]
    for lo in range(0, len(specs), step):
        idx = np.arange(lo, min(len(specs), lo + step))
        c, i = np.nonzero(match_matrix(specs.take(idx), scenes))  # (chunk, N) bool
        cap_parts.append(c + lo)
        img_parts.append(i)
    return PositiveSet(np.concatenate(cap_parts), np.concatenate(img_parts), n_images)


def _encode_captions(
    index: Index, captions: list[str], token_embeddings: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token features (float16 ``(U, L, d)``, with the layer-0 states in front when
    ``token_embeddings``: ``(U, L, width + d)``), mask ``(U, L)`` and pooled ``(U, D)`` float32."""
    encoder = index.encoder
    extra = {"token_embeddings": True} if token_embeddings else {}
    parts = [
        encoder.encode_text(captions[lo : lo + _ENCODE_CHUNK], **extra)
        for lo in range(0, len(captions), _ENCODE_CHUNK)
    ]
    length = max(p.tokens.shape[1] for p in parts)
    first = parts[0]
    width = 0 if first.token_embeddings is None else first.token_embeddings.shape[2]
    n, d = len(captions), width + first.tokens.shape[2]
    tokens = np.zeros((n, length, d), dtype=np.float16)
    mask = np.zeros((n, length), dtype=bool)
    pooled = np.empty((n, parts[0].pooled.shape[1]), dtype=np.float32)
    lo = 0
    for p in parts:
        hi = lo + p.tokens.shape[0]
        tokens[lo:hi, : p.tokens.shape[1]] = p.reranker_tokens()
        mask[lo:hi, : p.mask.shape[1]] = p.mask
        pooled[lo:hi] = p.pooled
        lo = hi
    return tokens, mask, pooled


def _gather_patches(index: Index, rows: np.ndarray) -> np.ndarray:
    """float16 ``(len(rows), P, d)`` patch features, read from the store once."""
    out = np.empty((rows.size, *index.patches.shape), dtype=np.float16)
    for lo in range(0, rows.size, _GATHER_CHUNK):
        out[lo : lo + _GATHER_CHUNK] = index.patches.gather(rows[lo : lo + _GATHER_CHUNK])
    return out


# -- candidate lists --------------------------------------------------------------------------


class CandidateSampler:
    """Draws candidate lists: the positive at column 0, then hard, in-batch and random negatives.

    No candidate after column 0 is ever a positive of the query's caption, and a list repeats an
    image only when the caption has fewer negatives than the list has slots.
    """

    def __init__(self, data: TrainingSet, n_candidates: int, in_batch: bool) -> None:
        self.data = data
        self.n_candidates = n_candidates
        self.in_batch = in_batch

    def sample(
        self,
        caption: np.ndarray,
        positive: np.ndarray,
        n_hard: int,
        rng: np.random.Generator,
        *,
        in_batch: bool | None = None,
    ) -> np.ndarray:
        """Candidate lists of a batch of queries.

        Args:
            caption: int64 ``(B,)`` caption of each query.
            positive: int64 ``(B,)`` its positive local image.
            n_hard: negatives per list taken from the caption's mined list (fewer when it is
                shorter; the rest are in-batch then random).
            rng: the generator to draw with.
            in_batch: override the sampler's ``in_batch`` (validation lists use none).

        Returns:
            int64 ``(B, n_candidates)`` local images, the positive in column 0.
        """
        in_batch = self.in_batch if in_batch is None else in_batch
        data, n_neg = self.data, self.n_candidates - 1
        out = np.empty((caption.size, self.n_candidates), dtype=np.int64)
        out[:, 0] = positive
        for i, (u, pos) in enumerate(zip(caption.tolist(), positive.tolist(), strict=True)):
            chosen: list[int] = []
            count = int(data.hard_count[u])
            if n_hard and count:
                pick = rng.permutation(count)[: min(n_hard, count)]
                chosen.extend(data.hard[u, pick].tolist())
            if in_batch and len(chosen) < n_neg:
                others = np.unique(np.delete(positive, i))
                others = others[~data.positives.contains(u, others)]
                others = others[~np.isin(others, chosen)]
                chosen.extend(rng.permutation(others)[: n_neg - len(chosen)].tolist())
            if len(chosen) < n_neg:
                chosen.extend(self._random_negatives(u, n_neg - len(chosen), chosen, rng))
            out[i, 1:] = chosen
            assert pos not in chosen  # a positive is never a negative (internal invariant)
        return out

    def _random_negatives(
        self, u: int, n: int, chosen: list[int], rng: np.random.Generator
    ) -> list[int]:
        """``n`` negatives of caption ``u`` from the random pool, avoiding ``chosen``."""
        data, pool = self.data, self.data.random_pool
        picked: list[int] = []
        for _ in range(4):  # rejection sampling: positives are a small share of the pool
            draw = pool[rng.integers(pool.size, size=2 * n + 8)]
            draw = draw[~data.positives.contains(u, draw)]
            for c in draw.tolist():
                if c not in picked and c not in chosen:
                    picked.append(c)
                    if len(picked) == n:
                        return picked
        # Few negatives left (a tiny pool, a caption true of most images): take them all, then
        # repeat them. prepare_training_set dropped captions with no negative at all.
        negatives = pool[~data.positives.contains(u, pool)]
        negatives = negatives[~np.isin(negatives, picked + chosen)]
        picked.extend(rng.permutation(negatives)[: n - len(picked)].tolist())
        if len(picked) < n:
            every = np.concatenate(
                [pool[~data.positives.contains(u, pool)], data.hard[u, : data.hard_count[u]]]
            )
            picked.extend(rng.choice(every, size=n - len(picked)).tolist())
        return picked

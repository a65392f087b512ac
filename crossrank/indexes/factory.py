"""Choosing and creating the FAISS index of the first stage.

Tiers of the automatic choice (``IndexConfig.factory=None``), for ``n`` vectors:

==========================================  =========================  =============================
corpus                                      factory                    why
==========================================  =========================  =============================
``n < flat_threshold`` (20k) or ``n == 0``  ``Flat``                   exact; a brute-force scan of
                                                                       20k x 512 floats takes ~1 ms
``n < 2M``                                  ``IVF{nlist},Flat``        exact scores inside the
                                                                       probed lists
``n >= 2M``                                 ``IVF{nlist},SQ8``         1 byte per dimension: a
                                                                       quarter of the memory; the
                                                                       reranker rescores anyway
``nlist >= 4096`` (a large ``train_size``)  ``IVF{nlist}_HNSW32,...``  coarse assignment through
                                                                       HNSW instead of a scan of
                                                                       every centroid
==========================================  =========================  =============================

``nlist`` is about ``4 * sqrt(n)`` (or ``IndexConfig.nlist``), then lowered so that every centroid
gets at least 39 training vectors out of ``min(n, train_size)``: FAISS's k-means warns below that
and its centroids get noisy. With the default ``train_size`` of 50k that caps ``nlist`` at 1282;
raise ``train_size`` for corpora of many millions.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

from crossrank.errors import InvalidArgumentError
from crossrank.indexes._faiss import faiss_reason
from crossrank.indexes.config import IndexConfig

__all__ = [
    "auto_factory",
    "auto_nlist",
    "create_index",
    "describe_index",
    "MIN_POINTS_PER_CENTROID",
]

logger = logging.getLogger(__name__)

#: FAISS's k-means warns when a centroid gets fewer training points than this.
MIN_POINTS_PER_CENTROID = 39
#: From this many vectors on, the auto tier stores 8-bit scalar-quantised codes instead of floats.
SQ8_THRESHOLD = 2_000_000
#: From this many lists on, the auto tier finds the nearest lists with an HNSW graph.
HNSW_QUANTIZER_THRESHOLD = 4096
#: Upper bound of the auto nlist (the top of FAISS's usual IVF range).
MAX_NLIST = 65_536

_FACTORY_EXAMPLES = "give a FAISS index_factory string such as 'IVF256,Flat', 'HNSW32' or 'Flat'"


def auto_nlist(n: int, config: IndexConfig) -> int:
    """The IVF list count for ``n`` vectors: ``config.nlist`` or ~4 sqrt(n), capped by the sample.

    Args:
        n: vectors in the corpus.
        config: ``nlist`` and ``train_size`` are read.

    Returns:
        An nlist >= 1 such that each centroid gets at least :data:`MIN_POINTS_PER_CENTROID`
        training vectors out of ``min(n, train_size)`` (when there are that many at all).
    """
    n_train = min(n, config.train_size)
    wanted = config.nlist
    if wanted is None:
        wanted = min(MAX_NLIST, max(1, round(4 * math.sqrt(n))))
    cap = max(1, n_train // MIN_POINTS_PER_CENTROID)
    if wanted > cap and config.nlist is not None:
        logger.warning(
            "nlist=%d needs %d training vectors but only %d are used (n=%d, train_size=%d); "
            "using nlist=%d",
            wanted,
            wanted * MIN_POINTS_PER_CENTROID,
            n_train,
            n,
            config.train_size,
            cap,
        )
    return min(wanted, cap)


def auto_factory(n: int, config: IndexConfig | None = None) -> str:
    """The FAISS factory string the first stage uses for ``n`` vectors (see the module's tiers).

    Args:
        n: vectors in the corpus.
        config: ``factory`` wins when set; else ``flat_threshold``, ``nlist`` and ``train_size``.

    Returns:
        A factory string, e.g. ``"Flat"`` or ``"IVF512,Flat"``.

    Example:
        >>> auto_factory(1_000), auto_factory(100_000)
        ('Flat', 'IVF1265,Flat')
    """
    config = config or IndexConfig()
    if config.factory is not None:
        return config.factory.strip()
    if n == 0 or n < config.flat_threshold:
        return "Flat"
    nlist = auto_nlist(n, config)
    quantizer = "_HNSW32" if nlist >= HNSW_QUANTIZER_THRESHOLD else ""
    codec = "SQ8" if n >= SQ8_THRESHOLD else "Flat"
    return f"IVF{nlist}{quantizer},{codec}"


def create_index(faiss: ModuleType, d: int, factory: str) -> Any:
    """An empty inner-product index with int64 ids: the factory's index inside an ``IndexIDMap``.

    A factory string that starts with ``IDMap`` or ``IDMap2`` is kept as it is.

    Raises:
        InvalidArgumentError: FAISS cannot parse ``factory`` (its reason is in the message).
    """
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidArgumentError(
            f"bad FAISS factory string {factory!r}: {faiss_reason(e)}; {_FACTORY_EXAMPLES}"
        ) from e
    # index_factory hands back the concrete, owning Python type: never downcast_index() it, since
    # the downcast copy does not own the C++ object and dangles once the original is collected.
    if not isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
        # IndexIDMap, not IndexIDMap2: the reverse map of IDMap2 (a hash map, ~40 bytes a vector)
        # serves only reconstruct-by-id, which the first stage never calls.
        index.this.disown()
        wrapped = faiss.IndexIDMap(index)
        wrapped.own_fields = True
        index = wrapped
    return index


#: ScalarQuantizer qtype names and the factory codes that make them.
_SQ_NAMES = {
    "QT_8bit": "SQ8",
    "QT_4bit": "SQ4",
    "QT_6bit": "SQ6",
    "QT_fp16": "SQfp16",
    "QT_bf16": "SQbf16",
    "QT_8bit_uniform": "SQ8_uniform",
    "QT_4bit_uniform": "SQ4_uniform",
    "QT_8bit_direct": "SQ8_direct",
}


def describe_index(faiss: ModuleType, index: Any) -> str:
    """A factory string for a built index (best effort: FAISS 1.15 has no reverse factory).

    Covers what :func:`auto_factory` makes (``Flat``, ``IVF{nlist}[_HNSW{M}],Flat|SQ8``) plus
    ``HNSW{M}``, ``PQ`` and other scalar quantisers; other types are named by their FAISS class.
    """
    concrete = faiss.downcast_index(index)  # a new name: see selectors.search_params
    if isinstance(concrete, faiss.IndexIDMap):
        return describe_index(faiss, concrete.index)
    if isinstance(concrete, faiss.IndexFlat):
        return "Flat"
    if isinstance(concrete, faiss.IndexHNSWFlat):
        return f"HNSW{concrete.hnsw.nb_neighbors(1)}"
    if isinstance(concrete, faiss.IndexIVF):
        quantizer = faiss.downcast_index(concrete.quantizer)
        if isinstance(quantizer, faiss.IndexFlat):
            coarse = f"IVF{concrete.nlist}"
        elif isinstance(quantizer, faiss.IndexHNSWFlat):
            coarse = f"IVF{concrete.nlist}_HNSW{quantizer.hnsw.nb_neighbors(1)}"
        else:
            return type(concrete).__name__
        if isinstance(concrete, faiss.IndexIVFFlat):
            return f"{coarse},Flat"
        if isinstance(concrete, faiss.IndexIVFScalarQuantizer):
            sq = faiss.ScalarQuantizer
            names = {getattr(sq, qt): code for qt, code in _SQ_NAMES.items() if hasattr(sq, qt)}
            if concrete.sq.qtype in names:
                return f"{coarse},{names[concrete.sq.qtype]}"
        if type(concrete) is faiss.IndexIVFPQ:
            return f"{coarse},PQ{concrete.pq.M}x{concrete.pq.nbits}"
    return type(concrete).__name__

"""Settings of the first stage: which FAISS index, how it is trained, where it is searched."""

from __future__ import annotations

from dataclasses import dataclass

from crossrank.device import Device

__all__ = ["IndexConfig"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class IndexConfig:
    """How the first stage is built and searched.

    With ``factory=None`` the index is chosen by corpus size (see :func:`auto_factory`): exact
    ``Flat`` under ``flat_threshold`` vectors, an IVF index above it. Any FAISS ``index_factory``
    string can be given instead; the metric is always inner product over normalised vectors.

    Example:
        >>> IndexConfig(factory="IVF256,Flat", nprobe=32).nprobe
        32
    """

    factory: str | None = None  # FAISS factory string ("IVF256,Flat", "HNSW32"); None = by size
    flat_threshold: int = 20_000  # corpora with fewer vectors get an exact Flat index (auto only)
    nlist: int | None = None  # IVF lists for the auto IVF tier; None = about 4 * sqrt(n)
    nprobe: int = 16  # IVF lists scanned per query (default; search(..., nprobe=) overrides)
    train_size: int = 50_000  # at most this many vectors (a seeded sample) train the index
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = the GPU when faiss-gpu sees one
    seed: int = 0  # seeds the training sample and k-means
    ef_search: int = 128  # HNSW candidate-list size at search time (HNSW indexes and quantizers)

    def __post_init__(self) -> None:
        if self.factory is not None and (
            not isinstance(self.factory, str) or not self.factory.strip()
        ):
            raise ValueError(
                "factory must be a non-empty FAISS factory string such as 'IVF256,Flat' "
                f"or 'HNSW32' (or None to choose by size), got {self.factory!r}"
            )
        if not _is_int(self.flat_threshold) or self.flat_threshold < 0:
            raise ValueError(
                f"flat_threshold must be an int >= 0 (vectors), got {self.flat_threshold!r}"
            )
        if self.nlist is not None and (not _is_int(self.nlist) or self.nlist < 1):
            raise ValueError(f"nlist must be None or an int >= 1 (IVF lists), got {self.nlist!r}")
        if not _is_int(self.nprobe) or self.nprobe < 1:
            raise ValueError(
                f"nprobe must be an int >= 1 (IVF lists scanned per query), got {self.nprobe!r}"
            )
        if not _is_int(self.train_size) or self.train_size < 1:
            raise ValueError(
                f"train_size must be an int >= 1 (training vectors), got {self.train_size!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not _is_int(self.ef_search) or self.ef_search < 1:
            raise ValueError(
                f"ef_search must be an int >= 1 (HNSW candidates), got {self.ef_search!r}"
            )
        device = str(self.device).lower()
        if device not in {d.value for d in Device} and not _is_cuda_n(device):
            raise ValueError(
                f"device must be one of auto, cpu, cuda or cuda:N, got {self.device!r}"
            )


def _is_cuda_n(device: str) -> bool:
    prefix, _, number = device.partition(":")
    return prefix == Device.CUDA and number.isdigit()

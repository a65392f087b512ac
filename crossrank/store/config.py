"""Settings of the index directory writers: shard and part sizes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    """How a generation lays out its patch shards and metadata parts.

    Readers never need this: every generation records its own layout in ``generation.json``.

    Example:
        >>> StoreConfig(patch_shard_rows=4096).patch_shard_rows
        4096
    """

    patch_shard_bytes: int = 1 << 30  # upper bound on one patch shard's payload, bytes (1 GiB)
    patch_shard_rows: int | None = None  # rows (images) per shard; None = as many as fit the bytes
    metadata_part_rows: int = 1_000_000  # rows per metadata Parquet file
    metadata_row_group_rows: int = 8_192  # rows per Parquet row group (the unit a scan can skip)

    def __post_init__(self) -> None:
        if self.patch_shard_bytes <= 0:
            raise ValueError(f"patch_shard_bytes must be > 0, got {self.patch_shard_bytes}")
        if self.patch_shard_rows is not None and self.patch_shard_rows <= 0:
            raise ValueError(f"patch_shard_rows must be > 0 or None, got {self.patch_shard_rows}")
        if self.metadata_part_rows <= 0:
            raise ValueError(f"metadata_part_rows must be > 0, got {self.metadata_part_rows}")
        if self.metadata_row_group_rows <= 0:
            raise ValueError(
                f"metadata_row_group_rows must be > 0, got {self.metadata_row_group_rows}"
            )

    def shard_rows_for(self, n_patches: int, patch_dim: int) -> int:
        """Rows per patch shard for features of shape ``(n_patches, patch_dim)`` in float16.

        Args:
            n_patches: P, patches per image.
            patch_dim: d, feature dim of one patch.

        Returns:
            ``patch_shard_rows`` when set, else the most rows whose payload fits in
            ``patch_shard_bytes`` (at least 1).
        """
        if self.patch_shard_rows is not None:
            return self.patch_shard_rows
        row_bytes = max(1, n_patches * patch_dim * 2)
        return max(1, self.patch_shard_bytes // row_bytes)

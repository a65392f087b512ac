"""Writing image metadata: Parquet parts and the skipped-files table of a generation.

Rows go in id-table order (row ``i`` describes ``ids[i]``), the order every per-image file of a
generation shares; :func:`~crossrank.store.check.check_generation` enforces it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from crossrank.errors import InvalidArgumentError
from crossrank.store.config import StoreConfig
from crossrank.store.layout import PartInfo, metadata_part_name

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["MetadataWriter", "write_skipped", "check_skipped_table"]

logger = logging.getLogger(__name__)

_PART_RE = re.compile(r"^metadata-(\d+)\.parquet$")


class MetadataWriter:
    """Streams metadata rows into Parquet parts of a generation folder.

    Rows are buffered up to one row group (``config.metadata_row_group_rows``) so that a build
    writing one small batch at a time still produces row groups DuckDB can skip by id range; a new
    part starts every ``config.metadata_part_rows`` rows. Write rows in id-table order.

    Args:
        directory: the (temporary) generation folder.
        config: part and row-group sizes.
        first_part: number of the first part file written.
    """

    def __init__(
        self, directory: Path | str, *, config: StoreConfig | None = None, first_part: int = 0
    ) -> None:
        self.dir = Path(directory)
        self.config = config if config is not None else StoreConfig()
        self._next_part = first_part
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._part_name = ""
        self._part_rows = 0
        self._parts: list[PartInfo] = []
        self._rows = 0
        self._closed = False

    @property
    def rows(self) -> int:
        """Rows written so far (buffered ones included)."""
        return self._rows

    @property
    def schema(self) -> pa.Schema | None:
        """The schema fixed by the first table written, or None."""
        return self._schema

    def write(self, table: pa.Table) -> None:
        """Append metadata rows.

        Args:
            table: a ``pyarrow.Table`` with an integer ``id`` column (stored as int64, no nulls)
                and the other metadata columns. The first table fixes the schema (a table of 0 rows
                may be written just to fix it); later ones are cast to it.

        Raises:
            InvalidArgumentError: not a table, no ``id`` column, null ids, duplicate column
                names, or columns / types that do not match the first table's.
        """
        import pyarrow as pa

        if self._closed:
            raise InvalidArgumentError("metadata writer is closed; write before commit()")
        if not isinstance(table, pa.Table):
            raise InvalidArgumentError(
                f"metadata must be a pyarrow.Table, got {type(table).__name__}"
            )
        names = table.column_names
        if len(set(names)) != len(names):
            dupes = sorted({c for c in names if names.count(c) > 1})
            raise InvalidArgumentError(f"metadata has duplicate columns: {', '.join(dupes)}")
        schema = self._schema
        if schema is None:
            if "id" not in names or not pa.types.is_integer(table.schema.field("id").type):
                raise InvalidArgumentError(
                    f"metadata needs an integer `id` column; got columns {names} "
                    f"with types {[str(t) for t in table.schema.types]}"
                )
            id_field = pa.field("id", pa.int64(), nullable=False)
            schema = pa.schema([id_field if f.name == "id" else f for f in table.schema])
        if names != schema.names:
            raise InvalidArgumentError(
                f"metadata columns {names} differ from the first table's {schema.names}"
            )
        if table.column("id").null_count:
            raise InvalidArgumentError("metadata `id` column holds nulls; every row needs an id")
        try:
            table = table.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise InvalidArgumentError(
                f"metadata of schema ({_schema_line(table.schema)}) cannot be cast to the first "
                f"table's ({_schema_line(schema)}): {_first_line(e)}"
            ) from e
        self._schema = schema  # fixed by the first table that passed every check
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self._rows += table.num_rows
            self._drain(final=False)

    def _drain(self, *, final: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rg = self.config.metadata_row_group_rows
        while self._pending_rows >= rg or (final and self._pending_rows > 0):
            buffered = pa.concat_tables(self._pending)
            if self._writer is None:
                self._part_name = metadata_part_name(self._next_part)
                self._next_part += 1
                self._part_rows = 0
                self._writer = pq.ParquetWriter(
                    self.dir / self._part_name, self._schema, compression="zstd"
                )
            take = min(rg, self._pending_rows, self.config.metadata_part_rows - self._part_rows)
            self._writer.write_table(buffered.slice(0, take), row_group_size=rg)
            self._part_rows += take
            rest = buffered.slice(take)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows -= take
            if self._part_rows >= self.config.metadata_part_rows:
                self._finish_part()

    def link_part(self, base_dir: Path | str, part: PartInfo) -> None:
        """Hard-link a part of an earlier generation as the next part, after the rows so far.

        Rows written before are flushed into a part of their own first, so the row order is the
        order of the calls. The first part linked or written fixes the schema.

        Args:
            base_dir: the earlier generation's folder.
            part: the part (``GenerationInfo.metadata_parts``).

        Raises:
            InvalidArgumentError: the part's schema differs from the rows written so far, or a
                part of that file name was already written.
        """
        import pyarrow.parquet as pq

        from crossrank.store._files import link_or_copy

        if self._closed:
            raise InvalidArgumentError("metadata writer is closed; link parts before commit()")
        src = Path(base_dir) / part.file
        schema = pq.read_schema(src).remove_metadata()
        if self._schema is None:
            self._schema = schema
        elif not schema.equals(self._schema.remove_metadata()):
            raise InvalidArgumentError(
                f"metadata part {src} has schema ({_schema_line(schema)}), but the rows written "
                f"before have ({_schema_line(self._schema)})"
            )
        self._drain(final=True)
        if self._writer is not None:
            self._finish_part()
        if (self.dir / part.file).exists():
            raise InvalidArgumentError(f"metadata part {part.file} was already written")
        link_or_copy(src, self.dir / part.file)
        self._parts.append(part)
        self._rows += part.rows
        m = _PART_RE.match(part.file)
        if m is not None:
            self._next_part = max(self._next_part, int(m.group(1)) + 1)

    def _finish_part(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._parts.append(PartInfo(file=self._part_name, rows=self._part_rows))
        self._writer = None

    def close(self) -> list[PartInfo]:
        """Flush and close; idempotent. Always leaves at least one part (maybe of 0 rows).

        Returns:
            Every part, in row order.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._closed:
            self._drain(final=True)
            if self._writer is not None:
                self._finish_part()
            if not self._parts:
                # A generation without images still needs one part, so that the view has columns.
                schema = self._schema or pa.schema([pa.field("id", pa.int64(), nullable=False)])
                name = metadata_part_name(self._next_part)
                self._next_part += 1
                pq.write_table(schema.empty_table(), self.dir / name, compression="zstd")
                self._parts.append(PartInfo(file=name, rows=0))
            self._closed = True
        return list(self._parts)

    def discard(self) -> None:
        """Close the open part without flushing (the caller removes the folder)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._pending = []
        self._closed = True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _schema_line(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def check_skipped_table(table: object) -> None:
    """Raise :class:`InvalidArgumentError` unless ``table`` is a pyarrow.Table with path, reason."""
    import pyarrow as pa

    if not isinstance(table, pa.Table) or not {"path", "reason"} <= set(table.column_names):
        got = table.column_names if isinstance(table, pa.Table) else type(table).__name__
        raise InvalidArgumentError(
            f"skipped files must be a pyarrow.Table with columns path, reason; got {got}"
        )


def write_skipped(path: Path | str, tables: Iterable[pa.Table]) -> int:
    """Write the skipped files of a build as a Parquet file with columns ``path``, ``reason``.

    Args:
        path: the file to write.
        tables: tables with (at least) string columns ``path`` and ``reason``; other columns are
            dropped.

    Returns:
        The number of rows written.

    Raises:
        InvalidArgumentError: a table lacks ``path`` or ``reason``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field("path", pa.string()), pa.field("reason", pa.string())])
    parts = []
    for table in tables:
        check_skipped_table(table)
        parts.append(table.select(["path", "reason"]).cast(schema))
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    pq.write_table(table, path, compression="zstd")
    return table.num_rows

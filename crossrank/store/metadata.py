"""Querying image metadata: DuckDB over a generation's Parquet parts.

Every image has one row: ``id`` (int64, the stable id), ``path`` (absolute), ``sha256``, ``width``,
``height``, ``bytes``, ``mtime`` and the source manifest's own columns. ``where`` filters are
DuckDB SQL boolean expressions over these columns, run against a relation named ``metadata``.

Two layouts behind the same API (``in_memory``): metadata up to ``IN_MEMORY_MAX_BYTES`` is loaded
once into an Arrow table that DuckDB scans in place, so :meth:`MetadataStore.rows` for a page of
hits is a positional take (well under a millisecond); larger metadata stays on disk behind a
``VIEW metadata AS SELECT * FROM read_parquet([...parts])``, where fetching hits costs a scan of
the row groups holding them.

``where`` is trusted input (a CLI user, a Python caller). It is parsed as exactly one SQL
expression, so it cannot smuggle in a second statement or close the surrounding query, but it may
hold subqueries. As defence in depth the DuckDB connection is then sandboxed: no file but the
metadata parts can be read (``enable_external_access = false``, ``allowed_paths``) and the
configuration is locked. Untrusted clients must go through structured filters compiled to
parameterised SQL instead.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import CrossrankError, FilterError, IndexCorruptError, InvalidArgumentError
from crossrank.store.layout import SKIPPED_NAME, read_generation_info

if TYPE_CHECKING:
    from collections.abc import Sequence

    import duckdb
    import pyarrow as pa

    from crossrank.store.filters import Filters

__all__ = ["MetadataStore", "read_skipped", "WHERE_HINT", "IN_MEMORY_MAX_BYTES"]

logger = logging.getLogger(__name__)

WHERE_HINT = (
    "where must be a DuckDB SQL boolean expression over the metadata columns, "
    "e.g. \"width > 100 AND path LIKE '%cat%'\""
)
#: Rows up to which :meth:`MetadataStore.rows` slices the in-memory table row by row rather than
#: calling ``Table.take`` (which imports ``pyarrow.compute``: about 50 ms of a cold search).
_SLICE_ROWS = 128
IN_MEMORY_MAX_BYTES = 1 << 30  # metadata (uncompressed Parquet bytes) loaded into memory by default
_UNKNOWN_COLUMN = re.compile(r'Referenced column "((?:[^"]|"")+)" not found')


def read_skipped(path: Path | str) -> pa.Table:
    """The ``path``, ``reason`` table of a generation's ``skipped.parquet``.

    Raises:
        IndexCorruptError: the file is missing or unreadable.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["path", "reason"])
    except (OSError, pa.ArrowException) as e:
        raise IndexCorruptError(
            f"{path} cannot be read ({type(e).__name__}: {e}); run `crossrank verify` on the index"
        ) from e


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _show(where: str) -> str:
    """``where`` on one line, shortened, for an error message."""
    text = " ".join(where.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _check_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"ids must be a 1-d integer array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ``ids`` in ``sorted_ids``; InvalidArgumentError naming any that are absent."""
    pos = np.searchsorted(sorted_ids, ids)
    ok = pos < sorted_ids.size
    ok[ok] = sorted_ids[pos[ok]] == ids[ok]
    if not ok.all():
        missing = np.unique(ids[~ok])
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if missing.size > 10 else "")
        raise InvalidArgumentError(
            f"{missing.size} id(s) not in the metadata: {shown}; ids come from search hits or "
            f"allowed_ids() of this index"
        )
    return pos


class MetadataStore:
    """DuckDB over the Parquet metadata of one generation; read-only.

    One in-memory DuckDB connection serves every thread: each thread queries through its own
    cursor of it, so one store may be used from many threads at once.

    Args:
        parts: the Parquet parts, in row order, all of one schema.
        skipped_path: the generation's ``skipped.parquet`` (None: no skipped files).
        in_memory: load the metadata into memory (True), leave it on disk behind a view (False),
            or decide by size (None: in memory up to ``IN_MEMORY_MAX_BYTES`` uncompressed).
        sandbox: once the metadata is reachable, forbid DuckDB every other file and lock its
            configuration.

    Raises:
        InvalidArgumentError: ``parts`` is empty.
        IndexCorruptError: a part cannot be read.

    Example:
        >>> store = MetadataStore.open("my-index/gen-000001")        # doctest: +SKIP
        >>> store.allowed_ids("width > 100 AND path LIKE '%cat%'")    # doctest: +SKIP
        array([ 3, 17, 42])
        >>> store.rows([42, 3])[0]["path"]                            # doctest: +SKIP
        '/photos/cat-on-mat.jpg'
    """

    def __init__(
        self,
        parts: Sequence[Path | str],
        *,
        skipped_path: Path | str | None = None,
        in_memory: bool | None = None,
        sandbox: bool = True,
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._parts = [Path(p).resolve() for p in parts]
        if not self._parts:
            raise InvalidArgumentError("a metadata store needs at least one Parquet part")
        self._skipped_path = Path(skipped_path) if skipped_path is not None else None
        self._sandbox = sandbox
        try:
            files = [pq.ParquetFile(p) for p in self._parts]
            self._schema = files[0].schema_arrow
            footers = [f.metadata for f in files]
            self._len = sum(f.num_rows for f in footers)
            size = sum(
                f.row_group(i).total_byte_size for f in footers for i in range(f.num_row_groups)
            )
            self._in_memory = size <= IN_MEMORY_MAX_BYTES if in_memory is None else bool(in_memory)
            self._table: pa.Table | None = None
            self._sorted_ids: np.ndarray | None = None  # the id column, ascending
            self._order: np.ndarray | None = None  # rows of _table in id order; None if sorted
            if self._in_memory:
                # Read by pyarrow alone: a search that filters nothing never imports DuckDB.
                table = pa.concat_tables([f.read() for f in files]).combine_chunks()
                self._table = _as_stored(table, self._schema)
                ids = _int64_values(self._table.column("id"))
                if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
                    self._order = np.argsort(ids, kind="stable")
                    ids = ids[self._order]
                self._sorted_ids = ids
        except (OSError, pa.ArrowException, KeyError) as e:
            raise IndexCorruptError(
                f"metadata in {self._parts[0].parent} cannot be read "
                f"({type(e).__name__}: {_first_line(e)}); run `crossrank verify`"
            ) from e
        self._con: duckdb.DuckDBPyConnection | None = None  # DuckDB, opened on the first query
        self._closed = False
        self._lock = threading.Lock()
        self._local = threading.local()
        logger.debug(
            "metadata of %d rows from %d part(s), %s",
            self._len,
            len(self._parts),
            "in memory" if self._in_memory else "on disk",
        )

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection, opened on first use (under ``_lock``): a view over the parts
        (on disk), or nothing (in memory: each cursor registers the table), then sandboxed."""
        import duckdb

        files = "[" + ", ".join(_sql_string(str(p)) for p in self._parts) + "]"
        con = duckdb.connect(":memory:")
        try:
            # The parts are immutable: caching their footers is always valid.
            con.execute("SET parquet_metadata_cache = true")
            if not self._in_memory:
                con.execute(f"CREATE VIEW metadata AS SELECT * FROM read_parquet({files})")
            if self._sandbox:
                if not self._in_memory:
                    con.execute(f"SET allowed_paths = {files}")
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
        except duckdb.Error as e:
            con.close()
            raise IndexCorruptError(
                f"metadata in {self._parts[0].parent} cannot be opened: {_first_line(e)}; "
                f"run `crossrank verify`"
            ) from e
        return con

    @classmethod
    def open(
        cls, gen_dir: Path | str, *, in_memory: bool | None = None, sandbox: bool = True
    ) -> MetadataStore:
        """Open the metadata of a generation folder.

        Args:
            gen_dir: the generation folder.
            in_memory: see the class docstring.
            sandbox: see the class docstring.

        Returns:
            The store.

        Raises:
            IndexCorruptError: ``generation.json`` or a part is missing or unreadable.
        """
        gen_dir = Path(gen_dir)
        info = read_generation_info(gen_dir)
        parts = [gen_dir / p.file for p in info.metadata_parts]
        missing = [p for p in parts if not p.is_file()]
        if missing or not parts:
            what = missing[0] if missing else f"{gen_dir}/metadata-*.parquet"
            raise IndexCorruptError(f"metadata part {what} is missing; run `crossrank verify`")
        return cls(parts, skipped_path=gen_dir / SKIPPED_NAME, in_memory=in_memory, sandbox=sandbox)

    # -- connection handling ------------------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        # Cursors live only in the thread-local, so a finished thread takes its cursor with it.
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            with self._lock:
                if self._closed:
                    raise CrossrankError("the metadata store is closed")
                if self._con is None:
                    self._con = self._connect()
                cur = self._con.cursor()
            if self._table is not None:
                cur.register("metadata", self._table)  # a per-connection view, zero-copy
            self._local.cursor = cur
        elif self._closed:
            raise CrossrankError("the metadata store is closed")
        return cur

    def close(self) -> None:
        """Close the DuckDB connection; later queries raise :class:`CrossrankError`."""
        with self._lock:
            self._closed = True
            if self._con is not None:
                self._con.close()
                self._con = None
        cur = getattr(self._local, "cursor", None)
        if cur is not None:
            cur.close()
            self._local.cursor = None

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the metadata (``id`` int64 first)."""
        return self._schema

    @property
    def columns(self) -> list[str]:
        """The metadata column names."""
        return list(self._schema.names)

    @property
    def in_memory(self) -> bool:
        """Whether the metadata was loaded into memory (else DuckDB reads the Parquet parts)."""
        return self._in_memory

    def __len__(self) -> int:
        return self._len

    # -- where ----------------------------------------------------------------------------------

    def _filter_error(self, where: str, error: BaseException) -> FilterError:
        m = _UNKNOWN_COLUMN.search(str(error))
        if m is not None:
            name = m.group(1).replace('""', '"')
            return FilterError(
                f'where "{_show(where)}" names an unknown column "{name}"; '
                f"the metadata columns are: {', '.join(self.columns)}"
            )
        return FilterError(f'where "{_show(where)}" is invalid: {_first_line(error)}; {WHERE_HINT}')

    def _run_error(self, where: str | None, error: BaseException) -> FilterError:
        """The FilterError for a query that failed while it ran (a value DuckDB cannot cast)."""
        if where is None:
            return FilterError(f"filters cannot be applied: {_first_line(error)}")
        return self._filter_error(where, error)

    def _compile_where(self, cur: duckdb.DuckDBPyConnection, where: str) -> duckdb.Expression:
        import duckdb

        if not isinstance(where, str):
            raise FilterError(f"where must be a string, got {type(where).__name__}; {WHERE_HINT}")
        if not where.strip():
            raise FilterError(f"where is empty; {WHERE_HINT}")
        try:
            # Parsed as exactly one expression: `x; DROP ...`, `x) UNION SELECT ...` or a trailing
            # ORDER BY are parser errors, never a second statement or a rewritten query.
            expr = duckdb.SQLExpression(where)
        except duckdb.Error as e:
            raise FilterError(
                f'where "{_show(where)}" is not a valid SQL expression: {_first_line(e)}; '
                f"{WHERE_HINT}"
            ) from e
        try:
            kind = str(cur.table("metadata").select(expr).types[0])  # binds, scans nothing
        except duckdb.Error as e:
            raise self._filter_error(where, e) from e
        if kind.strip('"') not in ("BOOLEAN", "NULL"):
            raise FilterError(
                f'where "{_show(where)}" is an expression of type {kind}, not a boolean; '
                f"{WHERE_HINT}"
            )
        return expr

    def check_where(self, where: str) -> None:
        """Raise :class:`FilterError` unless ``where`` is a boolean expression over the columns.

        Scans nothing, so a value DuckDB cannot cast (``width > 'abc'``) is only caught by
        :meth:`allowed_ids`.
        """
        self._compile_where(self._cursor(), where)

    def check_filters(self, filters: Filters) -> None:
        """Raise :class:`FilterError` unless ``filters`` fits the metadata schema; scans nothing.

        See :mod:`crossrank.store.filters` for the ``{column: value | {op: value}}`` form.
        """
        from crossrank.store.filters import compile_filters

        compile_filters(filters, self._schema)

    def _filtered(
        self, cur: duckdb.DuckDBPyConnection, where: str | None, filters: Filters | None
    ) -> duckdb.DuckDBPyRelation:
        """The ``metadata`` relation cut to the rows matching ``filters`` and ``where`` (both hold).

        Structured filters reach DuckDB as parameters, never as SQL text (see
        :func:`crossrank.store.filters.compile_filters`).
        """
        import duckdb

        from crossrank.store.filters import compile_filters

        rel = cur.table("metadata")
        if filters is not None:
            compiled = compile_filters(filters, self._schema)
            if not compiled.is_empty:
                try:
                    rel = cur.sql(
                        f"SELECT * FROM metadata WHERE {compiled.sql}", params=compiled.params
                    )
                except duckdb.Error as e:
                    raise FilterError(f"filters cannot be applied: {_first_line(e)}") from e
        if where is not None:
            rel = rel.filter(self._compile_where(cur, where))
        return rel

    def allowed_ids(
        self, where: str | None = None, *, filters: Filters | None = None
    ) -> np.ndarray:
        """The ids of the images that satisfy ``where`` and ``filters`` (all ids without either).

        Args:
            where: a DuckDB SQL boolean expression over the metadata columns (trusted input),
                e.g. ``"width > 100 AND path LIKE '%cat%'"``. Rows where it is NULL are excluded.
            filters: a structured filter ``{column: value | {op: value}}``, safe for untrusted
                input (see :mod:`crossrank.store.filters`): its values reach DuckDB as parameters.

        Returns:
            int64 array ``(n_allowed,)``, sorted ascending.

        Raises:
            FilterError: (one line) an unknown column (named, with the available columns listed),
                malformed SQL (DuckDB's reason and what ``where`` must be), an expression that is
                not boolean, a value DuckDB cannot cast; for ``filters`` an unknown operator or a
                value that does not fit its column.
        """
        import duckdb

        cur = self._cursor()
        rel = self._filtered(cur, where, filters)
        try:
            result = rel.project("id").order("id").fetchnumpy()
        except duckdb.Error as e:
            raise self._run_error(where, e) from e
        return np.asarray(result["id"], dtype=np.int64)

    # -- rows and tables ------------------------------------------------------------------------

    def rows(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """The metadata of the given ids, one dict per id, in the order given.

        Values are plain Python objects as pyarrow converts them (``datetime`` for timestamps;
        making them JSON-able is the caller's job).

        Args:
            ids: int array ``(k,)``; repeats allowed.

        Returns:
            ``k`` dicts ``{column: value}``.

        Raises:
            InvalidArgumentError: ``ids`` is not a 1-d integer array, or holds an id that is not
                in the metadata (the first few are named).
        """
        arr = _check_ids(ids)
        if arr.size == 0:
            return []
        if self._table is not None:
            if self._closed:
                raise CrossrankError("the metadata store is closed")
            assert self._sorted_ids is not None
            pos = _positions(self._sorted_ids, arr)
            rows = pos if self._order is None else self._order[pos]
            if rows.size <= _SLICE_ROWS:  # a search's hits: no pyarrow.compute import (cold start)
                import pyarrow as pa

                return _pylist(pa.concat_tables([self._table.slice(int(r), 1) for r in rows]))
            return self._table.take(rows).to_pylist()
        import duckdb

        cur = self._cursor()
        wanted = np.unique(arr)
        try:
            table = cur.sql(
                "SELECT * FROM metadata WHERE id IN (SELECT unnest($ids))",
                params={"ids": wanted.tolist()},
            ).to_arrow_table()
        except duckdb.Error as e:
            raise IndexCorruptError(f"metadata cannot be read: {_first_line(e)}") from e
        found = table.column("id").to_numpy()
        order = np.argsort(found, kind="stable")
        pos = _positions(found[order], arr)
        return table.take(order[pos]).to_pylist()

    def table(
        self,
        columns: Sequence[str] | str | None = None,
        where: str | None = None,
        *,
        filters: Filters | None = None,
    ) -> pa.Table:
        """Metadata as an Arrow table, ordered by id.

        Args:
            columns: the columns to return (default: all), in that order.
            where: an optional DuckDB SQL boolean expression, as in :meth:`allowed_ids`.
            filters: an optional structured filter, as in :meth:`allowed_ids`.

        Returns:
            ``pyarrow.Table`` with the columns asked for.

        Raises:
            FilterError: an unknown column (named, with the available columns listed) or a bad
                ``where``.
            InvalidArgumentError: ``columns`` is empty.
        """
        import duckdb

        if isinstance(columns, str):
            columns = [columns]
        if columns is not None:
            columns = list(columns)
            if not columns:
                raise InvalidArgumentError("columns is empty; name at least one, or pass None")
            unknown = [c for c in columns if c not in self._schema.names]
            if unknown:
                raise FilterError(
                    f'unknown column "{unknown[0]}"; the metadata columns are: '
                    f"{', '.join(self.columns)}"
                )
        cur = self._cursor()
        rel = self._filtered(cur, where, filters).order("id")
        if columns is not None:
            rel = rel.project(", ".join(_sql_ident(c) for c in columns))
        try:
            table = rel.to_arrow_table()
        except duckdb.Error as e:
            raise self._run_error(where, e) from e
        return _as_stored(table, self._schema)

    def skipped(self) -> pa.Table:
        """The files the build skipped: a table with string columns ``path`` and ``reason``."""
        import pyarrow as pa

        if self._skipped_path is None:
            empty = pa.array([], pa.string())
            return pa.table({"path": empty, "reason": empty})
        return read_skipped(self._skipped_path)


#: Microseconds per unit of the timestamp units :func:`_column_values` converts itself.
_MICROSECONDS = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _int64_values(col: pa.ChunkedArray) -> np.ndarray:
    """An int64 column without nulls as a numpy array, read from its buffers: ``to_numpy``
    imports pandas when it is installed (a 0.2 s import on a cold search)."""
    import pyarrow as pa

    if col.type != pa.int64() or col.null_count:
        return np.asarray(col.to_numpy(), dtype=np.int64)
    parts = [
        np.frombuffer(c.buffers()[1], dtype=np.int64)[c.offset : c.offset + len(c)]
        for c in col.chunks
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    """``table.to_pylist()``, but time-zoned timestamps in microseconds or coarser are made
    here: pyarrow converts those through pandas when pandas is installed (a 0.2 s import)."""
    names = table.column_names
    columns = [_column_values(col) for col in table.columns]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _column_values(col: pa.ChunkedArray) -> list[Any]:
    """The Python values of one column, as ``col.to_pylist()`` gives them."""
    import zoneinfo

    import pyarrow as pa

    kind = col.type
    if not (isinstance(kind, pa.TimestampType) and kind.tz and kind.unit in _MICROSECONDS):
        return col.to_pylist()
    try:
        tz = zoneinfo.ZoneInfo(kind.tz)
    except (ValueError, KeyError, OSError):  # a fixed offset such as "+02:00": not a zone name
        return col.to_pylist()
    per = _MICROSECONDS[kind.unit]
    ticks = [v for chunk in col.chunks for v in chunk.view(pa.int64()).to_pylist()]
    return [
        None if v is None else (_EPOCH + datetime.timedelta(microseconds=v * per)).astimezone(tz)
        for v in ticks
    ]


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _as_stored(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the stored column types (DuckDB may widen some); as is if they do not cast."""
    import pyarrow as pa

    target = pa.schema([schema.field(n) for n in table.column_names])
    if table.schema.equals(target):
        return table  # no cast: Table.cast imports pyarrow.compute
    try:
        return table.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return table

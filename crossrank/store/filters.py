"""Structured metadata filters: safe for untrusted clients, unlike a raw ``where``.

A filter is a mapping ``{column: value | {op: value}}``; all its conditions must hold::

    {"label": "cat",                              # label = 'cat'
     "width": {"ge": 256, "lt": 1024},            # 256 <= width < 1024
     "path": {"contains": "/2024/"},              # a substring, case-sensitive
     "camera": {"in": ["X100", "GR III", None]},  # one of these (None: a missing value)
     "rating": {"ne": None}}                      # rating IS NOT NULL

The operators are ``eq``, ``ne``, ``lt``, ``le``, ``gt``, ``ge``, ``in`` and ``contains``; a bare
value means ``eq``. Comparisons follow SQL: a missing (NULL) value never matches one, so test for it
with ``{"eq": None}`` / ``{"ne": None}``. ``contains`` applies to string columns only. Timestamp and
date columns take ISO-8601 strings (``"2024-01-31"``, ``"2024-01-31T12:00:00Z"``); a time without a
zone is UTC.

:func:`compile_filters` checks every column, operator and value against the metadata schema (a
mistake is one :class:`~crossrank.errors.FilterError` line naming what is valid), then compiles the
conditions to a DuckDB boolean expression whose values are all ``$f0, $f1, ...`` parameters. No
value is ever spliced into the SQL text and every column name comes from the schema, so a value such
as ``"'; COPY metadata TO '/tmp/x'; --"`` is only a string that no row equals.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeAlias

from crossrank.errors import FilterError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "Filters",
    "FilterOp",
    "OPS",
    "Condition",
    "CompiledFilters",
    "check_filter_shape",
    "parse_filters",
    "compile_filters",
]

#: ``{column: value | {op: value}}``: see the module docstring.
Filters: TypeAlias = Mapping[str, Any]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class FilterOp(StrEnum):
    """The operators of a structured filter."""

    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    IN = "in"
    CONTAINS = "contains"


#: The operators, as error messages list them.
OPS = ", ".join(op.value for op in FilterOp)
_SQL_COMPARISON = {
    FilterOp.EQ: "=",
    FilterOp.NE: "<>",
    FilterOp.LT: "<",
    FilterOp.LE: "<=",
    FilterOp.GT: ">",
    FilterOp.GE: ">=",
}
_ORDERING = (FilterOp.LT, FilterOp.LE, FilterOp.GT, FilterOp.GE)


@dataclass(frozen=True)
class Condition:
    """One checked condition of a filter.

    Attributes:
        column: a column of the metadata schema.
        op: the operator.
        value: the value converted for the column (``datetime`` for a timestamp column, ...);
            a tuple for ``in``; ``None`` only for ``eq`` / ``ne`` (a NULL test) and inside ``in``.
    """

    column: str
    op: FilterOp
    value: Any


@dataclass(frozen=True)
class CompiledFilters:
    """A filter compiled to DuckDB SQL.

    Attributes:
        sql: a boolean expression over the metadata columns with ``$f0``, ``$f1``, ...
            parameters; ``"TRUE"`` for an empty filter.
        params: the parameter values by name (without the ``$``).
        conditions: the checked conditions, in the order given.
    """

    sql: str
    params: dict[str, Any] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()

    @property
    def is_empty(self) -> bool:
        """Whether the filter has no condition (it matches every row)."""
        return not self.conditions


def parse_filters(filters: Filters, schema: pa.Schema) -> tuple[Condition, ...]:
    """Check a structured filter against the metadata schema.

    Args:
        filters: ``{column: value | {op: value, ...}}`` (see the module docstring).
        schema: the Arrow schema of the metadata (``MetadataStore.schema``).

    Returns:
        The conditions, in the order given, with values converted for their columns.

    Raises:
        FilterError: (one line) ``filters`` is not a mapping, names an unknown column (the columns
            are listed) or operator (the operators are listed), a value does not fit its column's
            type, ``in`` without a list, ``contains`` on a non-string column, ``null`` with an
            ordering operator.

    Example:
        >>> parse_filters({"width": {"ge": 256}}, store.schema)  # doctest: +SKIP
        (Condition(column='width', op=<FilterOp.GE: 'ge'>, value=256),)
    """
    _check_mapping(filters)
    conditions: list[Condition] = []
    for column, spec in filters.items():
        _check_name(column)
        if column not in schema.names:
            raise FilterError(
                f'filters name an unknown column "{_show_text(column)}"; '
                f"the metadata columns are: {', '.join(schema.names)}"
            )
        arrow_type = schema.field(column).type
        for op, value in _operations(column, spec):
            conditions.append(Condition(column, op, _check_value(column, op, value, arrow_type)))
    return tuple(conditions)


def check_filter_shape(filters: Filters) -> None:
    """Check the form of a structured filter without a schema: known operators, plain values.

    What a server checks when a request arrives, before any index is consulted; the columns and
    the value types are checked by :func:`parse_filters`.

    Args:
        filters: ``{column: value | {op: value, ...}}``.

    Raises:
        FilterError: (one line) not a mapping, a column name that is not a string, an unknown
            operator or none, ``in`` without a list, a value that is not a string, number,
            boolean or null.
    """
    _check_mapping(filters)
    for column, spec in filters.items():
        _check_name(column)
        name = _show_text(column)  # a client's column name may hold anything, newlines included
        for op, value in _operations(column, spec):
            for v in value if op is FilterOp.IN and isinstance(value, (list, tuple)) else [value]:
                if v is not None and not isinstance(v, (str, int, float)):
                    raise FilterError(
                        f'filter "{name}" {op.value}: expected a string, number, boolean or null, '
                        f"got {_show(v)}"
                    )
            if op is FilterOp.IN and not isinstance(value, (list, tuple)):
                raise FilterError(
                    f'filter "{name}" in: expected a list of values, got {_show(value)}'
                )


def _check_mapping(filters: Any) -> None:
    if not isinstance(filters, Mapping):
        raise FilterError(
            "filters must be a mapping {column: value | {op: value}}, got "
            f"{type(filters).__name__}"
        )


def _check_name(column: Any) -> None:
    if not isinstance(column, str):
        raise FilterError(f"filter column names must be strings, got {_show(column)}")


def _operations(column: str, spec: Any) -> list[tuple[FilterOp, Any]]:
    """The ``(op, value)`` pairs of a column's filter: ``{op: value, ...}`` or a bare value (eq)."""
    column = _show_text(column)
    if isinstance(spec, (list, tuple, set)):
        raise FilterError(
            f'filter on "{column}": a list is not one value; use '
            '{"in": [...]} to match any of several'
        )
    if not isinstance(spec, Mapping):
        return [(FilterOp.EQ, spec)]
    if not spec:
        raise FilterError(f'filter on "{column}" has no operator; give one of: {OPS}')
    pairs = []
    for op_name, value in spec.items():
        try:
            op = FilterOp(op_name)
        except ValueError:
            raise FilterError(
                f'filter on "{column}" has an unknown operator '
                f"{_show(op_name)}; the operators are: {OPS}"
            ) from None
        pairs.append((op, value))
    return pairs


def compile_filters(filters: Filters, schema: pa.Schema) -> CompiledFilters:
    """Check a structured filter and compile it to a parameterised DuckDB boolean expression.

    Args:
        filters: ``{column: value | {op: value, ...}}`` (see the module docstring).
        schema: the Arrow schema of the metadata.

    Returns:
        The :class:`CompiledFilters`: SQL text whose only values are ``$fN`` parameters, and the
        parameters; run it as ``SELECT ... FROM metadata WHERE <sql>`` with ``params``.

    Raises:
        FilterError: as :func:`parse_filters`.

    Example:
        >>> compile_filters({"width": {"ge": 256}, "label": "cat"}, schema).sql  # doctest: +SKIP
        '("width" >= $f0) AND ("label" = $f1)'
    """
    conditions = parse_filters(filters, schema)
    params: dict[str, Any] = {}

    def param(value: Any) -> str:
        name = f"f{len(params)}"
        params[name] = value
        return "$" + name

    parts = []
    for c in conditions:
        col = _ident(c.column)
        if c.op is FilterOp.IN:
            values = [v for v in c.value if v is not None]
            terms = [f"{col} IN (SELECT unnest({param(values)}))"] if values else []
            if len(values) < len(c.value):
                terms.append(f"{col} IS NULL")
            parts.append(" OR ".join(terms) or "FALSE")
        elif c.op is FilterOp.CONTAINS:
            parts.append(f"contains({col}, {param(c.value)})")
        elif c.value is None:
            parts.append(f"{col} IS NULL" if c.op is FilterOp.EQ else f"{col} IS NOT NULL")
        else:
            parts.append(f"{col} {_SQL_COMPARISON[c.op]} {param(c.value)}")
    sql = " AND ".join(f"({p})" for p in parts) if parts else "TRUE"
    return CompiledFilters(sql=sql, params=params, conditions=conditions)


# -- values -----------------------------------------------------------------------------------


def _kind(arrow_type: pa.DataType) -> str | None:
    """The family of an Arrow type that filters can compare, or None."""
    import pyarrow as pa

    t = pa.types
    if t.is_boolean(arrow_type):
        return "boolean"
    if t.is_integer(arrow_type) or t.is_floating(arrow_type) or t.is_decimal(arrow_type):
        return "number"
    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return "string"
    if t.is_timestamp(arrow_type):
        return "timestamp"
    if t.is_date(arrow_type):
        return "date"
    return None


def _check_value(column: str, op: FilterOp, value: Any, arrow_type: pa.DataType) -> Any:
    kind = _kind(arrow_type)
    where = f'filter "{column}" {op.value}'
    if kind is None:
        raise FilterError(
            f'{where}: column "{column}" has type {arrow_type}, which structured filters cannot '
            "compare; filter on a number, string, boolean, date or timestamp column"
        )
    if op is FilterOp.IN:
        if not isinstance(value, (list, tuple)):
            raise FilterError(f"{where}: expected a list of values, got {_show(value)}")
        return tuple(
            None if v is None else _convert(where, column, v, kind, arrow_type) for v in value
        )
    if op is FilterOp.CONTAINS:
        if kind != "string":
            raise FilterError(
                f'{where}: contains applies to string columns, but "{column}" is {arrow_type}; '
                "use eq, ne, lt, le, gt, ge or in"
            )
        if not isinstance(value, str):
            raise FilterError(f"{where}: expected a string, got {_show(value)}")
    if value is None:
        if op in _ORDERING or op is FilterOp.CONTAINS:
            raise FilterError(
                f'{where}: null cannot be compared; test for a missing value with {{"eq": null}} '
                'or {"ne": null}'
            )
        return None
    return _convert(where, column, value, kind, arrow_type)


def _convert(where: str, column: str, value: Any, kind: str, arrow_type: pa.DataType) -> Any:
    """``value`` as the Python type DuckDB compares with a ``kind`` column, else FilterError."""
    expected = {
        "number": "a number",
        "string": "a string",
        "boolean": "true or false",
        "timestamp": 'an ISO-8601 timestamp string such as "2024-01-31T12:00:00Z"',
        "date": 'an ISO-8601 date string such as "2024-01-31"',
    }[kind]
    mismatch = FilterError(
        f'{where}: column "{column}" is {arrow_type}, so the value must be {expected}, '
        f"got {_show(value)}"
    )
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise mismatch
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"{where}: the value must be a finite number, got {value}")
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise FilterError(f"{where}: {value} is outside the 64-bit integer range")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise mismatch
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise mismatch
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FilterError(
                f"{where}: the value is not valid Unicode text (a lone surrogate)"
            ) from None
        return value
    if kind == "date":
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise mismatch
    # timestamp
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            raise mismatch from None
    else:
        raise mismatch
    # A time without a zone is UTC; a zoned column compares instants, a naive one UTC wall times.
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    if getattr(arrow_type, "tz", None) is None:
        stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
    return stamp


# -- text -------------------------------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _show_text(text: str, limit: int = 60) -> str:
    """``text`` on one line and shortened, for an error message."""
    one_line = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A value as the error messages show it: its type and a short, one-line repr."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'"{_show_text(value)}"'
    shown = _show_text(repr(value))
    return f"{type(value).__name__} {shown}"

"""MetadataStore turns a search's rows into Python values without pandas, and exactly as pyarrow
would: ``_pylist`` against ``Table.to_pylist`` on every timestamp kind."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from crossrank.store.metadata import _int64_values, _pylist

TICKS = [0, None, 1_700_000_000, -86_400, 4_102_444_800]  # 2100-01-01 in seconds


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris", "+02:00", "America/New_York"])
def test_pylist_equals_pyarrow(unit: str, tz: str | None) -> None:
    scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000}[unit]
    ticks = [None if t is None else t * scale for t in TICKS]
    if unit == "ns":
        ticks = ticks[:4]  # the last one is out of range in nanoseconds
    table = pa.table(
        {
            "id": pa.array(range(len(ticks)), pa.int64()),
            "when": pa.array(ticks, pa.timestamp(unit, tz=tz)),
            "path": pa.array([f"/p/{i}" for i in range(len(ticks))]),
        }
    )
    got, want = _pylist(table), table.to_pylist()
    assert got == want
    assert [r["when"] and r["when"].utcoffset() for r in got] == [
        r["when"] and r["when"].utcoffset() for r in want
    ]


def test_int64_values_reads_every_chunk_and_offset() -> None:
    col = pa.chunked_array([pa.array([5, 6, 7], pa.int64()).slice(1), pa.array([9], pa.int64())])
    np.testing.assert_array_equal(_int64_values(col), [6, 7, 9])
    assert _int64_values(pa.chunked_array([], pa.int64())).size == 0
    np.testing.assert_array_equal(
        _int64_values(pa.chunked_array([pa.array([1, 2], pa.int32())])), [1, 2]
    )

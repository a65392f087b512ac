from __future__ import annotations

import datetime as dt
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrank.errors import CrossrankError, FilterError, InvalidArgumentError
from crossrank.store import WHERE_HINT, MetadataStore, MetadataWriter, StoreConfig

COLUMNS = "id, path, sha256, width, height, bytes, mtime, label, score"

# (where, the same predicate in Python; SQL's NULL semantics spelled out)
FILTERS = [
    ("width > 100", lambda r: r["width"] > 100),
    ("width > 100 AND path LIKE '%cats%'", lambda r: r["width"] > 100 and "cats" in r["path"]),
    ("label IS NULL", lambda r: r["label"] is None),
    ("label = 'dog' OR height < 50", lambda r: r["label"] == "dog" or r["height"] < 50),
    ("NOT (label = 'cat')", lambda r: r["label"] is not None and r["label"] != "cat"),
    ("mtime >= TIMESTAMP '2024-01-20'", lambda r: r["mtime"] >= dt.datetime(2024, 1, 20)),
    ("score BETWEEN 0.2 AND 0.6", lambda r: 0.2 <= r["score"] <= 0.6),
    ("id IN (2, 4, 99)", lambda r: r["id"] in (2, 4, 99)),
    ("regexp_matches(path, 'img_00[12]')", lambda r: re.search("img_00[12]", r["path"])),
    ("width > 100 -- a trailing comment", lambda r: r["width"] > 100),
    ("NULL", lambda r: False),
]


@pytest.fixture(params=[True, False], ids=["in_memory", "on_disk"])
def store(request, written):
    with MetadataStore.open(written.root / "gen-000001", in_memory=request.param) as s:
        assert s.in_memory is request.param
        yield s


def _expected(written, predicate) -> list[int]:
    return [r["id"] for r in written.metadata.to_pylist() if predicate(r)]


@pytest.mark.parametrize(("where", "predicate"), FILTERS, ids=[f[0] for f in FILTERS])
def test_allowed_ids_equal_a_python_filter(store, written, where, predicate) -> None:
    got = store.allowed_ids(where)
    assert got.dtype == np.int64
    assert got.tolist() == _expected(written, predicate)


def test_filters_are_not_trivial(written) -> None:
    # Guard against a fixture where every filter selects all or nothing.
    sizes = {len(_expected(written, p)) for _, p in FILTERS[:-1]}
    assert all(0 < s < 23 for s in sizes)


def test_schema_and_columns(store, written) -> None:
    assert store.columns == COLUMNS.split(", ")
    assert store.schema.field("id").type == pa.int64()
    assert store.schema.field("mtime").type == pa.timestamp("us")
    assert len(store) == 23


def test_unknown_column_is_named_with_the_available_columns(store) -> None:
    message = '^where "widht > 100" names an unknown column "widht"; the metadata columns are: '
    with pytest.raises(FilterError, match=message + COLUMNS + "$"):
        store.allowed_ids("widht > 100")
    with pytest.raises(FilterError, match='names an unknown column "lable"'):
        store.allowed_ids("lower(lable) = 'x'")


def test_malformed_where_gives_duckdb_reason_and_what_where_must_be(store) -> None:
    message = (
        'where "width >" is not a valid SQL expression: Parser Error: syntax error at or near ">"; '
    )
    with pytest.raises(FilterError, match="^" + re.escape(message + WHERE_HINT) + "$"):
        store.allowed_ids("width >")
    assert WHERE_HINT.endswith("e.g. \"width > 100 AND path LIKE '%cat%'\"")


@pytest.mark.parametrize(
    ("where", "kind"), [("width + 1", "INTEGER"), ("path", "VARCHAR"), ("'abc'", "VARCHAR")]
)
def test_non_boolean_where_is_rejected(store, where: str, kind: str) -> None:
    message = f"is an expression of type {kind}, not a boolean; where must be"
    with pytest.raises(FilterError, match=message):
        store.allowed_ids(where)


@pytest.mark.parametrize("where", ["", "   ", "\n"])
def test_empty_where_is_rejected(store, where: str) -> None:
    with pytest.raises(FilterError, match="^where is empty; where must be a DuckDB SQL boolean"):
        store.allowed_ids(where)


def test_uncastable_value_is_a_filter_error(store) -> None:
    with pytest.raises(FilterError, match="is invalid: Conversion Error: Could not convert .*abc"):
        store.allowed_ids("width > 'abc'")


@pytest.mark.parametrize(
    "where",
    [
        "width > 100; DROP VIEW metadata",
        "true) UNION SELECT 5 --",
        "width > 1) OR (1 = 1",
        "width > 1 ORDER BY 1",
        "width > 1, height > 1",
    ],
)
def test_where_cannot_inject_a_statement(store, written, where: str) -> None:
    with pytest.raises(FilterError, match="where must be a DuckDB SQL boolean expression") as info:
        store.allowed_ids(where)
    assert "\n" not in str(info.value)
    # nothing ran: the view is intact and answers as before
    assert store.allowed_ids("width > 100").tolist() == _expected(written, FILTERS[0][1])


def test_where_cannot_read_other_files(written, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    where = f"id IN (SELECT a FROM read_csv('{secret}'))"
    with MetadataStore.open(written.root / "gen-000001") as store:
        with pytest.raises(FilterError, match="Permission Error: Cannot access file"):
            store.allowed_ids(where)
    with MetadataStore.open(written.root / "gen-000001", sandbox=False) as store:
        assert store.allowed_ids(where).tolist() == []  # ids are even: id 1 does not exist


def test_every_filter_error_is_one_line(store) -> None:
    for where in ["widht > 1", "width >", "width", "width > 'abc'", "a\n>\nb"]:
        with pytest.raises(FilterError) as info:
            store.allowed_ids(where)
        assert "\n" not in str(info.value), where


def test_rows_follow_the_order_given(store, written) -> None:
    by_id = {r["id"]: r for r in written.metadata.to_pylist()}
    ids = np.array([written.ids[5], written.ids[0], written.ids[22], written.ids[5]])
    rows = store.rows(ids)
    assert [r["id"] for r in rows] == ids.tolist()
    assert rows == [by_id[i] for i in ids.tolist()]
    assert isinstance(rows[0]["mtime"], dt.datetime) and isinstance(rows[0]["width"], int)
    assert store.rows(np.zeros(0, np.int64)) == []
    assert store.rows([int(written.ids[3])])[0]["id"] == written.ids[3]


def test_rows_name_unknown_ids(store) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^2 id\(s\) not in the metadata: 1, 1000; ids"):
        store.rows(np.array([0, 1000, 1, 2]))
    with pytest.raises(InvalidArgumentError, match="ids must be integers, got dtype float64"):
        store.rows(np.array([0.0]))


def test_table_selects_columns_in_order_with_a_where(store, written) -> None:
    table = store.table(["path", "id"], where="width > 100")
    assert table.column_names == ["path", "id"]
    expected = [r for r in written.metadata.to_pylist() if r["width"] > 100]
    assert table.to_pylist() == [{"path": r["path"], "id": r["id"]} for r in expected]
    everything = store.table()
    assert everything.column_names == COLUMNS.split(", ")
    assert everything.to_pylist() == written.metadata.to_pylist()
    assert store.table("label").column_names == ["label"]


def test_table_rejects_unknown_and_empty_columns(store) -> None:
    message = f'^unknown column "nope"; the metadata columns are: {COLUMNS}$'
    with pytest.raises(FilterError, match=message):
        store.table(["path", "nope"])
    with pytest.raises(InvalidArgumentError, match="columns is empty"):
        store.table([])
    with pytest.raises(FilterError, match="not a valid SQL expression"):
        store.table(where="width >")


def test_skipped_round_trip(store, written) -> None:
    skipped = store.skipped()
    assert skipped.column_names == ["path", "reason"]
    assert skipped.to_pylist() == written.skipped.to_pylist()


def test_closed_store_refuses_queries(written) -> None:
    store = MetadataStore.open(written.root / "gen-000001")
    store.allowed_ids("width > 1")
    store.close()
    with pytest.raises(CrossrankError, match="the metadata store is closed"):
        store.allowed_ids("width > 1")
    with pytest.raises(CrossrankError, match="the metadata store is closed"):
        store.rows([0])


def test_eight_threads_query_one_store_concurrently(store, written) -> None:
    expected = {where: _expected(written, p) for where, p in FILTERS}
    by_id = {r["id"]: r for r in written.metadata.to_pylist()}
    barrier = threading.Barrier(8)
    failures: list[str] = []

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            barrier.wait()
            for i in range(12):
                where = FILTERS[(t + i) % len(FILTERS)][0]
                got = store.allowed_ids(where).tolist()
                if got != expected[where]:
                    failures.append(f"thread {t}: {where}: {got} != {expected[where]}")
                ids = rng.choice(written.ids, size=5)
                rows = store.rows(ids)
                if rows != [by_id[i] for i in ids.tolist()]:
                    failures.append(f"thread {t}: rows({ids.tolist()}) wrong")
        except Exception as e:  # surfaced below with the thread that raised it
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_parts_and_row_groups_follow_the_config(written) -> None:
    gen_dir = written.root / "gen-000001"
    # 23 rows arrived in batches of 7, 1, 0, 15; parts of 10 rows, row groups of 4.
    footers = [pq.ParquetFile(gen_dir / f"metadata-00{i}.parquet").metadata for i in range(3)]
    layout = [[f.row_group(g).num_rows for g in range(f.num_row_groups)] for f in footers]
    assert layout == [[4, 4, 2], [4, 4, 2], [3]]


def test_metadata_writer_rejects_bad_tables(tmp_path: Path) -> None:
    writer = MetadataWriter(tmp_path, config=StoreConfig())
    with pytest.raises(InvalidArgumentError, match="metadata must be a pyarrow.Table, got dict"):
        writer.write({"id": [1]})
    with pytest.raises(InvalidArgumentError, match="metadata needs an integer `id` column"):
        writer.write(pa.table({"path": ["a"]}))
    with pytest.raises(InvalidArgumentError, match="metadata `id` column holds nulls"):
        writer.write(pa.table({"id": pa.array([1, None], pa.int64())}))
    writer.write(pa.table({"id": pa.array([1], pa.int32()), "w": pa.array([3], pa.int32())}))
    assert writer.schema.field("id").type == pa.int64()
    message = r"metadata columns \['id', 'x'\] differ from the first table's \['id', 'w'\]"
    with pytest.raises(InvalidArgumentError, match=message):
        writer.write(pa.table({"id": [2], "x": [1]}))
    with pytest.raises(InvalidArgumentError, match="cannot be cast to the first table's"):
        writer.write(pa.table({"id": [2], "w": ["not a number"]}))
    with pytest.raises(InvalidArgumentError, match="metadata has duplicate columns: id"):
        writer.write(pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["id", "id"]))
    assert [p.rows for p in writer.close()] == [1]

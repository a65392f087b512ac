"""Structured filters: checked against the metadata schema, compiled to parameterised SQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crossrank.errors import FilterError
from crossrank.store import MetadataStore
from crossrank.store.filters import FilterOp, check_filter_shape, compile_filters, parse_filters

from .conftest import Written, write_generation

COLUMNS = "id, path, sha256, width, height, bytes, mtime, label, score"
OPS = "eq, ne, lt, le, gt, ge, in, contains"

# (filters, the same predicate in Python with SQL's NULL semantics spelled out)
FILTERS = [
    ({"width": {"gt": 100}}, lambda r: r["width"] > 100),
    (
        {"width": {"gt": 100}, "path": {"contains": "cats"}},
        lambda r: r["width"] > 100 and "cats" in r["path"],
    ),
    ({"label": "dog"}, lambda r: r["label"] == "dog"),
    ({"label": {"eq": "dog"}}, lambda r: r["label"] == "dog"),
    ({"label": None}, lambda r: r["label"] is None),
    ({"label": {"ne": None}}, lambda r: r["label"] is not None),
    ({"label": {"ne": "cat"}}, lambda r: r["label"] is not None and r["label"] != "cat"),
    ({"label": {"in": ["cat", None]}}, lambda r: r["label"] in ("cat", None)),
    ({"label": {"in": ["cat", "bird"]}}, lambda r: r["label"] in ("cat", "bird")),
    ({"mtime": {"ge": "2024-01-20"}}, lambda r: r["mtime"] >= dt.datetime(2024, 1, 20)),
    # a zoned value on a naive (UTC) column: 2024-01-20T00:00+01:00 is 2024-01-19T23:00 UTC
    (
        {"mtime": {"lt": "2024-01-20T00:00:00+01:00"}},
        lambda r: r["mtime"] < dt.datetime(2024, 1, 19, 23),
    ),
    ({"score": {"ge": 0.2, "le": 0.6}}, lambda r: 0.2 <= r["score"] <= 0.6),
    ({"id": {"in": [2, 4, 99]}}, lambda r: r["id"] in (2, 4, 99)),
    ({"width": {"ge": 100.5}}, lambda r: r["width"] >= 100.5),
    ({"path": {"lt": "/data/misc"}}, lambda r: r["path"] < "/data/misc"),
    (
        {"height": {"le": 200}, "label": {"in": ["dog", "cat"]}, "width": {"ne": 50}},
        lambda r: r["height"] <= 200 and r["label"] in ("dog", "cat") and r["width"] != 50,
    ),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    return write_generation(tmp_path_factory.mktemp("filters") / "idx")


@pytest.fixture(scope="module", params=[True, False], ids=["in_memory", "on_disk"])
def store(request, written: Written):
    with MetadataStore.open(written.root / "gen-000001", in_memory=request.param) as s:
        yield s


def _expected(written: Written, predicate) -> list[int]:
    return [r["id"] for r in written.metadata.to_pylist() if predicate(r)]


@pytest.mark.parametrize(("filters", "predicate"), FILTERS, ids=[str(f[0]) for f in FILTERS])
def test_allowed_ids_equal_a_python_filter(store, written, filters, predicate) -> None:
    got = store.allowed_ids(filters=filters)
    assert got.dtype == np.int64
    assert got.tolist() == _expected(written, predicate)


def test_filters_are_not_trivial(written) -> None:
    sizes = {len(_expected(written, p)) for _, p in FILTERS}
    assert all(0 < s < 23 for s in sizes)


def test_empty_filters_and_empty_in_list(store, written) -> None:
    assert store.allowed_ids(filters={}).tolist() == written.ids.tolist()
    assert store.allowed_ids().tolist() == written.ids.tolist()
    assert store.allowed_ids(filters={"label": {"in": []}}).tolist() == []


def test_where_and_filters_must_both_hold(store, written) -> None:
    got = store.allowed_ids("height < 200", filters={"label": "dog"})
    assert got.tolist() == _expected(written, lambda r: r["height"] < 200 and r["label"] == "dog")


def test_table_takes_filters(store, written) -> None:
    table = store.table(columns=["id", "label"], filters={"label": {"in": ["bird"]}})
    assert table.column_names == ["id", "label"]
    assert table.column("id").to_pylist() == _expected(written, lambda r: r["label"] == "bird")


def test_compiled_sql_holds_only_parameters() -> None:
    schema = pa.schema(
        [("id", pa.int64()), ("width", pa.int32()), ("label", pa.string()), ('we"ird', pa.string())]
    )
    compiled = compile_filters(
        {
            "width": {"ge": 256, "lt": 1024},
            "label": {"in": ["a", None]},
            'we"ird': {"contains": "x'y"},
            "id": {"ne": None},
        },
        schema,
    )
    assert compiled.sql == (
        '("width" >= $f0) AND ("width" < $f1) AND ("label" IN (SELECT unnest($f2)) '
        'OR "label" IS NULL) AND (contains("we""ird", $f3)) AND ("id" IS NOT NULL)'
    )
    assert compiled.params == {"f0": 256, "f1": 1024, "f2": ["a"], "f3": "x'y"}
    assert [c.op for c in compiled.conditions] == [
        FilterOp.GE,
        FilterOp.LT,
        FilterOp.IN,
        FilterOp.CONTAINS,
        FilterOp.NE,
    ]
    empty = compile_filters({}, schema)
    assert (empty.sql, empty.params, empty.is_empty) == ("TRUE", {}, True)


def test_timestamp_values_follow_the_column_zone() -> None:
    naive = pa.schema([("t", pa.timestamp("us"))])
    zoned = pa.schema([("t", pa.timestamp("us", tz="UTC"))])
    one = "2024-01-20T01:00:00+01:00"
    assert parse_filters({"t": one}, naive)[0].value == dt.datetime(2024, 1, 20, 0, 0)
    utc = dt.UTC
    assert parse_filters({"t": one}, zoned)[0].value == dt.datetime(2024, 1, 20, 0, 0, tzinfo=utc)
    assert parse_filters({"t": "2024-01-20"}, zoned)[0].value == dt.datetime(
        2024, 1, 20, tzinfo=utc
    )
    assert parse_filters({"t": dt.date(2024, 1, 20)}, naive)[0].value == dt.datetime(2024, 1, 20)


SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("width", pa.int32()),
        ("label", pa.string()),
        ("flag", pa.bool_()),
        ("mtime", pa.timestamp("us")),
        ("day", pa.date32()),
        ("tags", pa.list_(pa.string())),
    ]
)

BAD = [
    (["width"], "^filters must be a mapping {column: value | {op: value}}, got list$"),
    ({3: 1}, "^filter column names must be strings, got int 3$"),
    (
        {"widht": 3},
        '^filters name an unknown column "widht"; the metadata columns are: '
        "id, width, label, flag, mtime, day, tags$",
    ),
    ({"width": {}}, f'^filter on "width" has no operator; give one of: {OPS}$'),
    (
        {"width": {"like": 3}},
        f'^filter on "width" has an unknown operator "like"; the operators are: {OPS}$',
    ),
    ({"label": ["a", "b"]}, r'^filter on "label": a list is not one value; use {"in": \[...\]}'),
    (
        {"width": "abc"},
        '^filter "width" eq: column "width" is int32, so the value must be a number, got "abc"$',
    ),
    (
        {"width": {"gt": True}},
        'column "width" is int32, so the value must be a number, got bool True$',
    ),
    ({"label": 3}, 'column "label" is string, so the value must be a string, got int 3$'),
    ({"flag": 1}, 'column "flag" is bool, so the value must be true or false, got int 1$'),
    ({"mtime": {"ge": "yesterday"}}, "so the value must be an ISO-8601 timestamp string"),
    ({"day": "2024-13-01"}, "so the value must be an ISO-8601 date string"),
    (
        {"width": {"contains": "1"}},
        '^filter "width" contains: contains applies to string columns, but '
        '"width" is int32; use eq, ne, lt, le, gt, ge or in$',
    ),
    ({"label": {"contains": 3}}, '^filter "label" contains: expected a string, got int 3$'),
    (
        {"width": {"gt": None}},
        r'^filter "width" gt: null cannot be compared; test for a missing value '
        r'with {"eq": null} or {"ne": null}$',
    ),
    ({"width": {"in": 3}}, '^filter "width" in: expected a list of values, got int 3$'),
    ({"width": {"in": [1, "x"]}}, 'must be a number, got "x"$'),
    ({"width": float("nan")}, '^filter "width" eq: the value must be a finite number, got nan$'),
    ({"width": {"lt": 2**70}}, f'^filter "width" lt: {2**70} is outside the 64-bit integer range$'),
    (
        {"tags": "a"},
        '^filter "tags" eq: column "tags" has type list<item: string>, which structured '
        "filters cannot compare",
    ),
    ({"label": "\ud800"}, '^filter "label" eq: the value is not valid Unicode text'),
    ({"label\n; DROP": 1}, r'^filters name an unknown column "label\\n; DROP"'),
]

SHAPE_BAD = [
    ({"a\nb": {"like": 1}}, r'^filter on "a\\nb" has an unknown operator "like"'),
    ({"a\nb": [1]}, r'^filter on "a\\nb": a list is not one value'),
    (
        {"a\nb": {"eq": {"x": 1}}},
        r"^filter \"a\\nb\" eq: expected a string, number, boolean or null, got dict",
    ),
    (
        {"a": {"in": [[1]]}},
        r'^filter "a" in: expected a string, number, boolean or null, got list \[1\]$',
    ),
    ({"a": {"in": "x"}}, r'^filter "a" in: expected a list of values, got "x"$'),
    ({"a": {}}, '^filter on "a" has no operator'),
    ("a", "^filters must be a mapping"),
]


@pytest.mark.parametrize(
    ("filters", "message"), SHAPE_BAD, ids=[str(i) for i in range(len(SHAPE_BAD))]
)
def test_shape_check_needs_no_schema_and_keeps_messages_on_one_line(filters, message) -> None:
    with pytest.raises(FilterError, match=message) as info:
        check_filter_shape(filters)
    assert "\n" not in str(info.value)


def test_shape_check_accepts_every_valid_form() -> None:
    check_filter_shape(
        {
            "a": 1,
            "b": None,
            "c": {"in": [1, "x", None, True, 2.5]},
            "d": {"contains": "x", "ne": None},
        }
    )


@pytest.mark.parametrize(("filters", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_filters_are_one_line_errors_naming_what_is_valid(filters, message) -> None:
    with pytest.raises(FilterError, match=message) as info:
        compile_filters(filters, SCHEMA)
    assert "\n" not in str(info.value)


def test_store_checks_filters_without_scanning(store) -> None:
    store.check_filters({"width": {"gt": 3}})
    with pytest.raises(
        FilterError, match='unknown column "nope"; the metadata columns are: ' + COLUMNS
    ):
        store.check_filters({"nope": 1})
    with pytest.raises(FilterError, match='unknown column "nope"'):
        store.allowed_ids(filters={"nope": 1})


INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP VIEW metadata; --",
    "cat'); DROP TABLE metadata; --",
    "' UNION SELECT 1 --",
    "read_csv('{secret}')",
    "x' OR id IN (SELECT a FROM read_csv('{secret}')) OR '",
    "'; COPY (SELECT * FROM metadata) TO '{out}' (FORMAT csv); --",
    "x\"; COPY metadata TO '{out}'; --",
    "%cats%",  # LIKE wildcards are plain characters to contains
    "c_ts",
]


@pytest.mark.parametrize("raw", INJECTIONS)
def test_injection_through_filter_values_matches_nothing_and_runs_nothing(
    store, written, tmp_path: Path, raw: str
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n0\n2\n4\n")
    out = tmp_path / "stolen.csv"
    value = raw.format(secret=secret, out=out)
    before = store.table()
    for filters in (
        {"label": value},
        {"path": {"contains": value}},
        {"label": {"in": [value, value]}},
        {"sha256": {"ge": value, "le": value}},
        {"label": {"ne": value}, "path": value},
    ):
        assert store.allowed_ids(filters=filters).tolist() == []
        assert value not in compile_filters(filters, store.schema).sql
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]
    assert store.table().equals(before)
    assert store.allowed_ids(filters={"width": {"gt": 100}}).tolist() == _expected(
        written, FILTERS[0][1]
    )


@pytest.mark.parametrize(
    "column",
    [
        "label = 'x' OR 1=1 --",
        'label" OR "1"="1',
        "read_csv('/etc/passwd')",
        "*",
        "label; COPY metadata TO '/tmp/x'",
    ],
)
def test_injection_through_filter_columns_is_rejected_by_the_schema(store, column: str) -> None:
    with pytest.raises(
        FilterError, match="unknown column .*; the metadata columns are: " + COLUMNS
    ):
        store.allowed_ids(filters={column: "x"})


# -- through Index ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(built_index: Path):
    from crossrank import Index

    return Index.open(built_index, device="cpu")


def test_index_search_filters_equal_the_same_where(index) -> None:
    paths = index.metadata(columns=["path"]).column("path").to_pylist()
    nested = [p for p in paths if "/nested/" in p]
    assert 0 < len(nested) < len(paths)
    by_filters = index.search(
        "a red circle", k=5, rerank_k=10, filters={"path": {"contains": "/nested/"}}
    )
    by_where = index.search("a red circle", k=5, rerank_k=10, where="contains(path, '/nested/')")
    assert [h.id for h in by_filters] == [h.id for h in by_where]
    assert all("/nested/" in h.path for h in by_filters)
    assert by_filters.counts.filtered_out == len(paths) - len(nested)

    xq = index.encoder.encode_text(["a red circle"]).pooled
    vec = index.search_vectors(xq, k=3, filters={"path": {"contains": "/nested/"}})[0]
    assert all("/nested/" in h.path for h in vec) and len(vec) == 3
    batch = index.search_batch(
        ["a red circle", "a blue square"],
        k=2,
        reranker=None,
        filters={"path": {"contains": "/nested/"}},
    )
    assert all("/nested/" in h.path for result in batch for h in result)


def test_index_metadata_filters_on_a_zoned_timestamp(index) -> None:
    everything = index.metadata(columns=["id"])
    assert index.metadata(columns=["id"], filters={"mtime": {"le": "2999-01-01"}}).equals(
        everything
    )
    assert (
        index.metadata(columns=["id"], filters={"mtime": {"lt": "1971-01-01T00:00:00Z"}}).num_rows
        == 0
    )


def test_index_search_rejects_an_unknown_filter_column(index) -> None:
    with pytest.raises(
        FilterError, match='unknown column "colour"; the metadata columns are: id, path'
    ):
        index.search("a red circle", k=2, rerank_k=2, filters={"colour": "red"})

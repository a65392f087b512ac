from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossrank.datasets import (
    HELDOUT_PAIRS,
    QueryKind,
    QuerySpec,
    ShapesDataset,
    generate_shapes,
    open_shapes,
    parse_query,
    satisfies,
)
from crossrank.datasets import shapes as shapes_module
from crossrank.errors import InvalidArgumentError

N_IMAGES, N_QUERIES = 60, 30  # the sizes of the conftest corpora (checked below)

HELD_TEXT = {f"{c.value} {s.value}" for c, s in HELDOUT_PAIRS}
_OBJ_RE = re.compile(
    r"\b(red|green|blue|yellow|purple|orange) (circle|square|triangle|diamond|cross)\b"
)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _qrels(path: Path) -> set[tuple[str, str]]:
    out = set()
    for line in path.read_text().splitlines():
        qid, zero, docid, rel = line.split()
        assert zero == "0" and rel == "1"
        out.add((qid, docid))
    return out


def test_writes_the_documented_files_and_columns(test_corpus: ShapesDataset):
    root = test_corpus.root
    assert (test_corpus.n_images, test_corpus.n_queries) == (N_IMAGES, N_QUERIES)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(
        ["images", "metadata.parquet", "queries.parquet", "qrels.txt", "pairs.parquet"]
        + ["dataset.json"]
    )
    pngs = sorted(p.name for p in (root / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(N_IMAGES)]
    with Image.open(root / "images" / pngs[0]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    meta = pq.read_table(test_corpus.metadata_path)
    assert meta.column("path").to_pylist() == [f"images/{p}" for p in pngs]
    scene_columns = {"n_objects", "colours", "shapes", "sizes", "rows", "cols", "objects"}
    assert scene_columns | {"has_heldout"} <= set(meta.column_names)
    queries = pq.read_table(test_corpus.queries_path)
    assert queries.column_names[:4] == ["query_id", "text", "kind", "heldout"]
    assert queries.column("query_id").to_pylist() == [f"q{i:05d}" for i in range(N_QUERIES)]
    kinds = queries.column("kind").to_pylist()
    assert {k: kinds.count(k) for k in set(kinds)} == {"single": 10, "pair": 10, "relation": 10}
    pairs = pq.read_table(test_corpus.pairs_path)
    assert pairs.column_names == ["path", "caption", "kind", "heldout", "spec"]
    assert set(pairs.column("path").to_pylist()) == set(meta.column("path").to_pylist())
    info = json.loads(test_corpus.info_path.read_text())
    assert info["counts"]["images"] == N_IMAGES and info["counts"]["pairs"] == pairs.num_rows
    reopened = open_shapes(root)
    assert reopened == test_corpus


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    tmp_path, test_corpus, monkeypatch
):
    again = generate_shapes(tmp_path / "again", n_images=N_IMAGES, n_queries=N_QUERIES, seed=7)
    assert _files(again.root) == _files(test_corpus.root)
    # split across 2 processes in small chunks: still the same bytes
    monkeypatch.setattr(shapes_module, "_CHUNK", 25)
    pooled = generate_shapes(
        tmp_path / "pooled", n_images=N_IMAGES, n_queries=N_QUERIES, seed=7, workers=2
    )
    assert _files(pooled.root) == _files(test_corpus.root)
    other = generate_shapes(tmp_path / "other", n_images=N_IMAGES, n_queries=N_QUERIES, seed=8)
    a, b = _files(other.root), _files(test_corpus.root)
    assert sum(a[k] != b[k] for k in a if k.startswith("images/")) == N_IMAGES


def test_every_query_has_a_relevant_image(test_corpus, train_corpus):
    for ds in (test_corpus, train_corpus):
        qids = pq.read_table(ds.queries_path).column("query_id").to_pylist()
        judged = {q for q, _ in _qrels(ds.qrels_path)}
        assert judged == set(qids)
        n_rel = pq.read_table(ds.queries_path).column("n_relevant").to_pylist()
        counts = {}
        for q, _ in _qrels(ds.qrels_path):
            counts[q] = counts.get(q, 0) + 1
        assert [counts[q] for q in qids] == n_rel


_SQL_RELEVANCE = """
WITH obj AS (
    SELECT path, unnest(range(n_objects)) AS k, unnest(colours) AS colour, unnest(shapes) AS shape,
           unnest(sizes) AS size, unnest(rows) AS r, unnest(cols) AS c
    FROM read_parquet($meta)
),
q AS (SELECT * FROM q_specs),
single AS (
    SELECT DISTINCT q.qid, x.path FROM q JOIN obj x
      ON x.colour = q.a_colour AND x.shape = q.a_shape AND (q.a_size IS NULL OR x.size = q.a_size)
    WHERE q.kind = 'single'
),
two AS (
    SELECT DISTINCT q.qid, x.path FROM q
    JOIN obj x ON x.colour = q.a_colour AND x.shape = q.a_shape
              AND (q.a_size IS NULL OR x.size = q.a_size)
    JOIN obj y ON y.path = x.path AND y.k <> x.k
              AND y.colour = q.b_colour AND y.shape = q.b_shape
              AND (q.b_size IS NULL OR y.size = q.b_size)
    WHERE q.kind = 'pair'
       OR (q.rel = 'left of' AND x.c < y.c) OR (q.rel = 'right of' AND x.c > y.c)
       OR (q.rel = 'above' AND x.r < y.r) OR (q.rel = 'below' AND x.r > y.r)
)
SELECT qid, path FROM single UNION SELECT qid, path FROM two
"""


def _spec_rows(ds: ShapesDataset) -> list[tuple]:
    rows = []
    queries = pq.read_table(ds.queries_path).to_pylist()
    for q in queries:
        s = parse_query(q["text"])
        b = s.b
        rows.append(
            (
                q["query_id"],
                s.kind.value,
                s.a.colour.value,
                s.a.shape.value,
                s.a.size and s.a.size.value,
                b and b.colour.value,
                b and b.shape.value,
                b and b.size and b.size.value,
                s.relation and s.relation.value,
            )
        )
    return rows


def test_qrels_equal_relevance_recomputed_by_duckdb_over_scene_columns(test_corpus, train_corpus):
    for ds in (test_corpus, train_corpus):
        con = duckdb.connect()
        con.execute(
            "CREATE TABLE q_specs (qid VARCHAR, kind VARCHAR, a_colour VARCHAR, a_shape VARCHAR, "
            "a_size VARCHAR, b_colour VARCHAR, b_shape VARCHAR, b_size VARCHAR, rel VARCHAR)"
        )
        con.executemany("INSERT INTO q_specs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", _spec_rows(ds))
        rows = con.execute(_SQL_RELEVANCE, {"meta": str(ds.metadata_path)}).fetchall()
        got = set(map(tuple, rows))
        assert got == _qrels(ds.qrels_path)
        assert len(got) > N_QUERIES


def _holds(objs: list[dict], text: str) -> bool:
    """Relevance from segmented objects, written independently of crossrank's matcher."""
    spec = parse_query(text)

    def match(o, spec_obj):
        return (
            o["colour"] == spec_obj.colour.value
            and o["shape"] == spec_obj.shape.value
            and (spec_obj.size is None or o["size"] == spec_obj.size.value)
        )

    if spec.kind is QueryKind.SINGLE:
        return any(match(o, spec.a) for o in objs)
    rel = {
        None: lambda x, y: True,
        "left of": lambda x, y: x["bbox"][2] < y["bbox"][0],  # pixel extents, not cells
        "right of": lambda x, y: x["bbox"][0] > y["bbox"][2],
        "above": lambda x, y: x["bbox"][3] < y["bbox"][1],
        "below": lambda x, y: x["bbox"][1] > y["bbox"][3],
    }[spec.relation and spec.relation.value]
    return any(
        i != j and match(x, spec.a) and match(y, spec.b) and rel(x, y)
        for i, x in enumerate(objs)
        for j, y in enumerate(objs)
    )


def test_qrels_equal_relevance_recomputed_from_pixels(test_corpus, segment):
    root = test_corpus.root
    meta = pq.read_table(test_corpus.metadata_path).to_pylist()
    found = {}
    for row in meta:
        objs = segment(np.asarray(Image.open(root / row["path"]).convert("RGB")))
        # the scene graph agrees with the pixels (colour, shape, size, cell, bounding box) ...
        stored = json.loads(row["objects"])
        stored = [{k: v for k, v in o.items() if k not in ("cx", "cy")} for o in stored]
        assert objs == stored
        found[row["path"]] = objs
    # ... and relevance judged on pixel extents gives exactly the qrels
    queries = pq.read_table(test_corpus.queries_path).to_pylist()
    got = {
        (q["query_id"], p) for q in queries for p, objs in found.items() if _holds(objs, q["text"])
    }
    assert got == _qrels(test_corpus.qrels_path)


def test_heldout_flags_are_exact_and_the_test_split_has_heldout_queries(test_corpus):
    queries = pq.read_table(test_corpus.queries_path).to_pylist()
    for q in queries:
        mentioned = set(_OBJ_RE.findall(q["text"]))
        assert q["heldout"] == bool(mentioned & {tuple(h.split()) for h in HELD_TEXT})
    n_held = sum(q["heldout"] for q in queries)
    assert n_held == test_corpus.n_heldout_queries >= 0.2 * N_QUERIES
    assert any(q["heldout"] for q in queries if q["kind"] == "relation")
    meta = pq.read_table(test_corpus.metadata_path).to_pylist()
    assert any(r["has_heldout"] for r in meta)


def test_train_split_never_contains_heldout_pairs(train_corpus, test_corpus, segment):
    held = {tuple(h.split()) for h in HELD_TEXT}
    meta = pq.read_table(train_corpus.metadata_path).to_pylist()
    for row in meta:
        assert not row["has_heldout"]
        assert not set(zip(row["colours"], row["shapes"], strict=True)) & held
        pixels = np.asarray(Image.open(train_corpus.root / row["path"]).convert("RGB"))
        assert not {(o["colour"], o["shape"]) for o in segment(pixels)} & held
    for table in (pq.read_table(train_corpus.pairs_path), pq.read_table(train_corpus.queries_path)):
        texts = table.column(table.column_names[1]).to_pylist()
        assert not any(set(_OBJ_RE.findall(t)) & held for t in texts)
        assert not any(table.column("heldout").to_pylist())
    # a disjoint stream: no training image equals a test image
    train_bytes = {p.read_bytes() for p in (train_corpus.root / "images").iterdir()}
    assert not train_bytes & {p.read_bytes() for p in (test_corpus.root / "images").iterdir()}


def test_pairs_are_true_captions_of_their_image(test_corpus):
    paths = pq.read_table(test_corpus.metadata_path).column("path").to_pylist()
    scenes = dict(zip(paths, test_corpus.scenes(), strict=True))
    pairs = pq.read_table(test_corpus.pairs_path).to_pylist()
    per_image = {}
    for p in pairs:
        spec = parse_query(p["caption"])
        assert QuerySpec.from_dict(json.loads(p["spec"])) == spec
        assert p["kind"] == spec.kind.value and p["heldout"] == spec.heldout
        assert satisfies(scenes[p["path"]], spec)
        per_image.setdefault(p["path"], set()).add(p["kind"])
    for path, kinds in per_image.items():
        n_obj = len(scenes[path].objects)
        assert kinds == ({"single"} if n_obj == 1 else {"single", "pair", "relation"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0, "n_queries": 1}, "n_images must be an integer >= 1, got 0"),
        ({"n_images": 5, "n_queries": -1}, "n_queries must be an integer >= 0, got -1"),
        (
            {"n_images": 5, "n_queries": 1, "image_size": 128},
            r"image_size must be an integer in \[64, 96\]",
        ),
        ({"n_images": 5, "n_queries": 1, "split": "dev"}, "split must be one of"),
        ({"n_images": 1, "n_queries": 50}, "n_queries=50 is more than the"),
        ({"n_images": 5, "n_queries": 1, "workers": -2}, "workers must be an integer >= 0"),
    ],
)
def test_bad_input_raises_one_clear_line(tmp_path, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        generate_shapes(tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*.png"))  # nothing half-written left behind


def test_non_empty_dir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="is not empty; choose another dir or pass over"):
        generate_shapes(out, n_images=3, n_queries=1)
    first = generate_shapes(out, n_images=12, n_queries=3, seed=1, overwrite=True)
    second = generate_shapes(out, n_images=4, n_queries=2, seed=2, overwrite=True)
    assert len(list(second.images_dir.iterdir())) == 4 and first.n_images == 12
    # only the generator's own outputs are replaced
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="exists and is not a directory"):
        generate_shapes(tmp_path / "file", n_images=3, n_queries=1)
    with pytest.raises(InvalidArgumentError, match="is not a shapes dataset"):
        open_shapes(tmp_path)


def test_overwrite_never_deletes_images_the_generator_did_not_write(tmp_path):
    # overwrite removes images/ whole: a folder of the user's photos must be refused, not emptied.
    out = tmp_path / "photos"
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(
        InvalidArgumentError,
        match=r"images/ folder holding files the generator did not write \(holiday\.jpg\); "
        "overwrite would delete them",
    ):
        generate_shapes(out, n_images=3, n_queries=1, overwrite=True)
    assert (out / "images" / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in out.rglob("*")) == ["holiday.jpg", "images"]


def test_progress_is_reported_up_to_n_images(tmp_path):
    calls = []
    generate_shapes(
        tmp_path / "p", n_images=7, n_queries=0, progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1] == (7, 7)

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crossrank.store.generation_writer as generation_module
from crossrank.errors import (
    CrossrankError,
    IndexCorruptError,
    IndexNotFoundError,
    InvalidArgumentError,
)
from crossrank.store import (
    Generation,
    GenerationWriter,
    StoreConfig,
    check_generation,
    check_index,
    has_index,
    list_generations,
    list_tmp_dirs,
    pin_current,
    read_manifest,
)

from .conftest import make_metadata


@contextlib.contextmanager
def read_only_pin(root: Path):
    """Hold the current generation like a reader does (so commits keep it)."""
    _, pin = pin_current(root)
    try:
        yield
    finally:
        pin.release()


def _snapshot(root: Path) -> tuple[bytes, dict[str, bytes]]:
    """manifest.json and every file of the current generation, byte for byte."""
    manifest = read_manifest(root)
    files = {p.name: p.read_bytes() for p in manifest.generation_path.iterdir()}
    return (root / "manifest.json").read_bytes(), files


def _fill(writer: GenerationWriter, n: int = 4, *, patch_rows: int | None = None) -> None:
    writer.patches.append(np.ones((n if patch_rows is None else patch_rows, 2, 3), np.float32))
    writer.write_vectors(np.ones((n, 5), np.float32))
    writer.write_ids(np.arange(n))
    writer.write_metadata(pa.table({"id": pa.array(np.arange(n), pa.int64()), "path": ["p"] * n}))
    writer.first_stage_path.write_bytes(b"faiss")


def test_exception_in_writer_leaves_previous_generation_and_no_tmp_dir(written) -> None:
    before = _snapshot(written.root)
    with pytest.raises(RuntimeError, match="encoder blew up"):
        with GenerationWriter(written.root) as w:
            w.patches.append(np.zeros((3, 3, 4), np.float32))
            w.write_metadata(written.metadata.slice(0, 3))
            assert w.dir.is_dir()
            raise RuntimeError("encoder blew up")
    assert not w.dir.exists()
    assert list_tmp_dirs(written.root) == []
    assert [g.number for g in list_generations(written.root)] == [1]
    assert _snapshot(written.root) == before
    np.testing.assert_array_equal(Generation.current(written.root).ids(), written.ids)


def test_leaving_writer_without_commit_discards_it(tmp_path: Path) -> None:
    with GenerationWriter(tmp_path / "idx") as w:
        _fill(w)
    assert not w.dir.exists()
    with pytest.raises(IndexNotFoundError, match="no committed index in"):
        read_manifest(tmp_path / "idx")
    with pytest.raises(CrossrankError, match="already aborted"):
        w.commit({})


def test_crash_between_generation_rename_and_manifest_switch(
    written, make_generation, monkeypatch
) -> None:
    before = _snapshot(written.root)

    def crash(manifest):  # the process dies after renaming gen-000002, before manifest.json moves
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(generation_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        make_generation(written.root, n=9, seed=3)
    monkeypatch.undo()

    # The old manifest still points to the old generation, which still opens whole.
    assert _snapshot(written.root) == before
    assert read_manifest(written.root).generation == 1
    gen = Generation.current(written.root)
    np.testing.assert_array_equal(gen.ids(), written.ids)
    np.testing.assert_array_equal(
        gen.patches().gather(np.arange(len(gen))), written.patches.astype(np.float16)
    )
    assert check_index(written.root) == []
    # The renamed generation is complete but not current; the next writer does not reuse its name.
    gens = list_generations(written.root)
    assert [(g.number, g.current) for g in gens] == [(1, True), (2, False)]
    assert check_generation(written.root / "gen-000002") == []
    nxt = make_generation(written.root, n=8, seed=4)
    assert nxt.generation == 3 == read_manifest(written.root).generation


def test_commit_refuses_an_inconsistent_generation(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    with pytest.raises(
        IndexCorruptError,
        match="refusing to commit generation 1: patch shards hold 3 rows in total, expected 4",
    ):
        with GenerationWriter(root) as w:
            _fill(w, n=4, patch_rows=3)
            w.commit({})
    assert not w.dir.exists()
    with pytest.raises(IndexNotFoundError, match="no committed index"):
        read_manifest(root)


def test_commit_refuses_metadata_out_of_id_order(tmp_path: Path) -> None:
    with pytest.raises(IndexCorruptError, match="metadata row 0 has id 1, but ids.npy has 0 there"):
        with GenerationWriter(tmp_path / "idx") as w:
            w.patches.append(np.ones((2, 2, 3), np.float32))
            w.write_vectors(np.ones((2, 5), np.float32))
            w.write_ids(np.array([0, 1]))
            w.write_metadata(pa.table({"id": pa.array([1, 0], pa.int64())}))
            w.first_stage_path.write_bytes(b"faiss")
            w.commit({})


@pytest.mark.parametrize(
    ("skip", "message"),
    [
        ("vectors", r"write_vectors\(\) was not called before commit\(\)"),
        ("ids", r"write_ids\(\) was not called before commit\(\)"),
        ("first_stage", "the first-stage index was not saved to .*first_stage.faiss before commit"),
    ],
)
def test_commit_requires_every_part(tmp_path: Path, skip: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        with GenerationWriter(tmp_path / "idx") as w:
            w.patches.append(np.ones((2, 2, 3), np.float32))
            w.write_metadata(pa.table({"id": pa.array([0, 1], pa.int64())}))
            if skip != "vectors":
                w.write_vectors(np.ones((2, 5), np.float32))
            if skip != "ids":
                w.write_ids(np.array([0, 1]))
            if skip != "first_stage":
                w.first_stage_path.write_bytes(b"faiss")
            w.commit({})
    assert list_tmp_dirs(tmp_path / "idx") == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"generation": 9}, "manifest_fields must not set generation; the writer sets them"),
        ({"counts": {"images": 5}}, "counts.images is 5, but the generation holds 4"),
    ],
)
def test_commit_rejects_bad_manifest_fields(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        with GenerationWriter(tmp_path / "idx") as w:
            _fill(w)
            w.commit(fields)
    assert list_tmp_dirs(tmp_path / "idx") == []


def test_commit_merges_caller_counts_and_keyword_fields(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    assert not has_index(root)
    with GenerationWriter(root) as w:
        _fill(w)
        assert w.commit({"counts": {"images": 4, "sources": 6}}, encoder={"model_id": "m"}) == 1
    assert has_index(root)
    manifest = read_manifest(root)
    assert manifest.counts == {"images": 4, "sources": 6, "skipped": 0}
    assert manifest.encoder == {"model_id": "m"}


def test_generation_of_zero_images_commits_and_opens(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    with GenerationWriter(root) as w:
        w.patches.append(np.zeros((0, 2, 3), np.float32))  # declares (P, d) without rows
        w.write_vectors(np.zeros((0, 5), np.float32))
        w.write_ids(np.zeros(0, np.int64))
        empty = pa.table({"id": pa.array([], pa.int64()), "path": pa.array([], pa.string())})
        w.write_metadata(empty)  # declares the schema without rows
        w.write_skipped(pa.table({"path": ["/a.png"], "reason": ["zero-byte file"]}))
        w.first_stage_path.write_bytes(b"faiss")
        w.commit({})
    gen = Generation.current(root)
    assert len(gen) == 0 and gen.vectors().shape == (0, 5)
    patches = gen.patches()
    assert len(patches) == 0 and patches.shape == (2, 3)
    assert patches.gather(np.zeros(0, np.int64)).shape == (0, 2, 3)
    with gen.metadata() as meta:
        assert meta.columns == ["id", "path"]
        assert meta.allowed_ids("path LIKE '%a%'").tolist() == []
        assert meta.skipped().to_pylist() == [{"path": "/a.png", "reason": "zero-byte file"}]
    assert check_index(root) == []


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.array([0, 2, 2]), r"sorted ascending and unique, but ids\[1\] = 2 and ids\[2\] = 2"),
        (np.array([3, 1]), r"ids\[0\] = 3 and ids\[1\] = 1"),
        (np.array([0.0, 1.0]), "ids must be a 1-d integer array, got float64"),
    ],
)
def test_write_ids_rejects_bad_id_tables(tmp_path: Path, ids: np.ndarray, message: str) -> None:
    with GenerationWriter(tmp_path / "idx") as w:
        with pytest.raises(InvalidArgumentError, match=message):
            w.write_ids(ids)


def test_write_vectors_rejects_non_finite_and_twice(tmp_path: Path) -> None:
    with GenerationWriter(tmp_path / "idx") as w:
        with pytest.raises(InvalidArgumentError, match="vectors hold NaN or inf"):
            w.write_vectors(np.array([[np.nan, 1.0]], np.float32))
        with pytest.raises(InvalidArgumentError, match=r"must be a float array of shape \(n, dim"):
            w.write_vectors(np.ones(3, np.float32))
        w.write_vectors(np.ones((1, 2), np.float32))
        with pytest.raises(InvalidArgumentError, match="vectors were already written"):
            w.write_vectors(np.ones((1, 2), np.float32))
        with pytest.raises(InvalidArgumentError, match="columns path, reason; got \\['path'\\]"):
            w.write_skipped(pa.table({"path": ["x"]}))


def test_index_path_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "idx").write_text("not a dir")
    with pytest.raises(InvalidArgumentError, match="exists and is not a directory"):
        GenerationWriter(tmp_path / "idx")


def test_rows_of_ids_names_unknown_ids(written) -> None:
    gen = Generation.current(written.root)
    with pytest.raises(InvalidArgumentError, match="2 id\\(s\\) not in generation 1: 1, 999"):
        gen.rows_of_ids(np.array([0, 1, 999]))


def test_check_generation_passes_a_sound_generation(written) -> None:
    assert check_generation(written.root / "gen-000001") == []
    assert check_index(written.root) == []


def test_check_generation_catches_a_deleted_shard(written) -> None:
    gen_dir = written.root / "gen-000001"
    (gen_dir / "patches-002.npy").unlink()
    problems = check_generation(gen_dir)
    assert problems[0] == f"{gen_dir / 'patches-002.npy'} is missing"
    assert check_index(written.root) == problems


def test_check_generation_catches_a_metadata_count_mismatch(written) -> None:
    gen_dir = written.root / "gen-000001"
    part = gen_dir / "metadata-002.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)
    problems = check_generation(gen_dir)
    assert any(p.startswith(f"{part} has ") and "bytes, generation.json" in p for p in problems)
    assert f"metadata part {part} has 2 rows, generation.json records 3" in problems


def test_check_generation_catches_a_vector_count_mismatch(written) -> None:
    gen_dir = written.root / "gen-000001"
    np.save(gen_dir / "vectors.npy", written.vectors[:-1])
    problems = check_generation(gen_dir)
    assert f"vectors {gen_dir / 'vectors.npy'} has shape (22, 5), expected (23, 5)" in problems


def test_check_generation_catches_unsorted_ids(written) -> None:
    gen_dir = written.root / "gen-000001"
    np.save(gen_dir / "ids.npy", written.ids[::-1].copy())  # same size: only the order is wrong
    first, second = written.ids[-1], written.ids[-2]
    assert check_generation(gen_dir) == [
        f"ids are not sorted and unique: ids[0] = {first}, ids[1] = {second}"
    ]


def test_check_generation_catches_a_manifest_count_disagreement(written) -> None:
    path = written.root / "manifest.json"
    data = json.loads(path.read_text())
    data["counts"]["images"] = 24
    path.write_text(json.dumps(data))
    assert check_index(written.root) == [
        "manifest counts.images is 24, generation gen-000001 holds 23"
    ]


def test_check_generation_reports_a_missing_generation_json(written) -> None:
    gen_dir = written.root / "gen-000001"
    (gen_dir / "generation.json").unlink()
    problems = check_generation(gen_dir)
    assert len(problems) == 1 and "generation.json is missing" in problems[0]
    with pytest.raises(IndexCorruptError, match="generation.json is missing"):
        Generation.current(written.root)


def test_a_truncated_generation_json_names_the_index_in_its_hints(written) -> None:
    info = written.root / "gen-000001" / "generation.json"
    info.write_text(info.read_text()[:40])
    with pytest.raises(IndexCorruptError, match="cannot be read") as err:
        Generation.current(written.root)
    message = str(err.value)
    assert f"`crossrank verify {written.root}`" in message
    assert f"--index {written.root} --overwrite`" in message and "\n" not in message


def test_store_config_validates() -> None:
    with pytest.raises(ValueError, match="patch_shard_rows must be > 0 or None, got 0"):
        StoreConfig(patch_shard_rows=0)
    with pytest.raises(ValueError, match="patch_shard_bytes must be > 0"):
        StoreConfig(patch_shard_bytes=-1)
    with pytest.raises(ValueError, match="metadata_part_rows must be > 0"):
        StoreConfig(metadata_part_rows=0)
    with pytest.raises(ValueError, match="metadata_row_group_rows must be > 0"):
        StoreConfig(metadata_row_group_rows=0)
    assert StoreConfig().shard_rows_for(50, 512) == (1 << 30) // (50 * 512 * 2)


# -- generations built on a base: links, tombstones, ids that are never reused ------------------


def _extend(written, *, add: int = 0, tombstones: np.ndarray | None = None) -> Generation:
    """Commit a generation on top of ``written``'s: its files linked, ``add`` new rows appended."""
    base = Generation.current(written.root)
    rng = np.random.default_rng(9)
    with GenerationWriter(written.root, base=base) as w:
        w.link_patches()
        for part in base.info.metadata_parts:
            w.link_metadata_part(part)
        new_ids = w.take_ids(add)
        w.patches.append(rng.standard_normal((add, 3, 4)).astype(np.float32))
        if add:
            w.write_metadata(
                make_metadata(new_ids, seed=5)
                .select(written.metadata.column_names)
                .cast(written.metadata.schema)
            )
        w.write_vectors([base.vectors(), rng.standard_normal((add, 5)).astype(np.float32)])
        w.write_ids(np.concatenate([base.ids(), new_ids]))
        w.link("first_stage.faiss")
        w.link("skipped.parquet")
        if tombstones is not None:
            w.write_tombstones(tombstones)
        w.commit({})
    return Generation.current(written.root)


def test_a_generation_on_a_base_links_its_segments_and_appends_after_them(written) -> None:
    base_shards = Generation.current(written.root).info.patch_shards
    with read_only_pin(written.root):
        gen = _extend(written, add=3)
        old = Generation(written.root / "gen-000001")
        for part in base_shards + old.info.metadata_parts:
            assert (gen.path / part.file).stat().st_ino == (old.path / part.file).stat().st_ino
    assert gen.ids().tolist() == [*written.ids.tolist(), 45, 46, 47]  # after the base's largest id
    assert [s.file for s in gen.info.patch_shards][-1] == f"patches-{len(base_shards):03d}.npy"
    np.testing.assert_array_equal(
        gen.patches().gather(np.arange(23)), written.patches.astype(np.float16)
    )
    with gen.metadata() as meta:
        assert meta.table(columns="id").column("id").to_pylist() == gen.ids().tolist()
    assert check_index(written.root) == [] and gen.next_id == 48


def test_tombstones_are_counted_and_need_format_version_2(written) -> None:
    gen = _extend(written, tombstones=np.array([2, 40]))
    assert gen.tombstones().tolist() == [2, 40] and gen.info.n_live == 21 and len(gen) == 23
    assert 2 not in gen.live_ids() and gen.live_ids().size == 21
    manifest = read_manifest(written.root)
    assert manifest.format_version == gen.info.format_version == 2
    assert manifest.counts == {"images": 21, "skipped": 2, "tombstones": 2}
    assert check_index(written.root) == []


@pytest.mark.parametrize(
    ("tombstones", "message"),
    [
        (np.array([3]), "hold id 3, which is not in ids.npy"),
        (np.array([4, 2]), "tombstones must be sorted ascending and unique"),
    ],
)
def test_bad_tombstones_are_refused(written, tombstones: np.ndarray, message: str) -> None:
    with pytest.raises((IndexCorruptError, InvalidArgumentError), match=message):
        _extend(written, tombstones=tombstones)
    assert read_manifest(written.root).generation == 1


def test_check_generation_catches_a_next_id_that_would_repeat_an_id(written) -> None:
    gen_dir = written.root / "gen-000001"
    info = json.loads((gen_dir / "generation.json").read_text())
    info["next_id"] = 10
    (gen_dir / "generation.json").write_text(json.dumps(info))
    assert check_generation(gen_dir) == [
        "generation.json has next_id 10, but ids.npy already "
        "holds id 44: a later add would give an id twice"
    ]


def test_ids_continue_after_every_id_ever_given(written, make_generation) -> None:
    assert Generation.current(written.root).next_id == 45
    with GenerationWriter(written.root) as w:  # a rebuild: no base, but the directory remembers
        assert w.take_ids(2).tolist() == [45, 46]
        w.abort()


# -- arrays are loaded once per opened generation, and shared across threads --------------------


@pytest.fixture
def count_np_load(monkeypatch):
    """Counts ``numpy.load`` calls (by file name) from here on."""
    calls: list[str] = []
    real = np.load

    def counting(file, *args, **kwargs):
        calls.append(Path(file).name)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting)
    return calls


def test_generation_arrays_are_loaded_once_and_read_only(written, count_np_load) -> None:
    gen = _extend(written, tombstones=np.array([2, 40]))
    count_np_load.clear()
    for _ in range(3):
        gen.ids(), gen.vectors(), gen.tombstones(), gen.live_ids()
        gen.rows_of_ids(np.array([0, 44]))
    assert sorted(count_np_load) == ["ids.npy", "tombstones.npy", "vectors.npy"]
    assert gen.ids() is gen.ids() and gen.live_ids() is gen.live_ids()
    for arr in (gen.ids(), gen.vectors(), gen.tombstones(), gen.live_ids()):
        assert not arr.flags.writeable  # shared by every caller: nobody may change it
    assert gen.rows_of_ids(np.array([0, 44])).tolist() == [0, 22]


def test_many_threads_opening_one_generation_load_each_array_once(written, count_np_load) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    _extend(written, tombstones=np.array([4, 6]))
    gen = Generation.current(written.root)
    count_np_load.clear()
    start = threading.Barrier(16)
    wanted = np.array([0, 8, 44])

    def work(_: int) -> tuple[list[int], list[int], int]:
        start.wait()
        return (
            gen.rows_of_ids(wanted).tolist(),
            gen.live_ids().tolist(),
            int(gen.vectors().shape[0]),
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(16)))
    live = [i for i in written.ids.tolist() if i not in (4, 6)]
    assert results == [([0, 4, 22], live, 23)] * 16
    assert sorted(count_np_load) == ["ids.npy", "tombstones.npy", "vectors.npy"]


def test_a_search_reads_no_array_file_again_after_the_first(built_index, count_np_load) -> None:
    """Every search used to np.load ids.npy (rows_of_ids); under load that raised SystemError."""
    from concurrent.futures import ThreadPoolExecutor

    from crossrank import Index

    index = Index.open(built_index, device="cpu")
    first = index.search("a red circle", k=5, rerank_k=8, reranker="maxsim")
    filtered = index.search("a red circle", k=3, where="id < 10", reranker="maxsim")
    count_np_load.clear()
    again = index.search("a red circle", k=5, rerank_k=8, reranker="maxsim")
    assert count_np_load == []
    with ThreadPoolExecutor(8) as pool:
        many = list(
            pool.map(
                lambda i: index.search(
                    "a red circle",
                    k=3 if i % 2 else 5,
                    rerank_k=8,
                    reranker="maxsim",
                    where="id < 10" if i % 2 else None,
                ),
                range(32),
            )
        )
    assert count_np_load == []
    key = [h.id for h in first.hits]
    assert [h.id for h in again.hits] == key
    for i, result in enumerate(many):
        assert [h.id for h in result.hits] == ([h.id for h in filtered.hits] if i % 2 else key)

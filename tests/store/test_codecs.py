"""Patch codecs: round trips, what a generation records, verify, old generations, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store import (
    FORMAT_VERSION,
    Generation,
    GenerationWriter,
    PatchStore,
    StoreConfig,
    check_generation,
    read_generation_info,
    read_manifest,
)
from crossrank.store.codecs import (
    PQ_FILE,
    BinaryCodec,
    Int8Codec,
    OPQCodec,
    PQCodec,
    parse_codec,
)

DATA = Path(__file__).parent / "data" / "pre-codec"


def _patches(n: int = 60, n_patches: int = 16, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit-norm patch features, as encoders store them (float16-exact, as builds append them)."""
    x = np.random.default_rng(seed).standard_normal((n, n_patches, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def _write(root: Path, patches: np.ndarray, codec: str | None, *, shard_rows: int = 7) -> int:
    n = patches.shape[0]
    ids = np.arange(n, dtype=np.int64) * 3
    with GenerationWriter(
        root, config=StoreConfig(patch_shard_rows=shard_rows), patch_codec=codec
    ) as w:
        for i0 in range(0, n, 9):  # uneven batches across shard boundaries
            w.patches.append(patches[i0 : i0 + 9])
        w.write_vectors(np.ones((n, 2), np.float32))
        w.write_ids(ids)
        w.write_metadata(pa.table({"id": pa.array(ids, pa.int64())}))
        w.write_skipped(
            pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        )
        w.first_stage_path.write_bytes(b"faiss-placeholder")
        return w.commit({"encoder": {"model_id": "tiny"}})


# -- round trips ---------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step():
    x = _patches()
    codec = Int8Codec()
    stored = codec.encode(x)
    assert stored.dtype == np.int8 and stored.shape == (60, 16, 32 + 2)
    y = codec.decode(stored, 32)
    assert y.dtype == np.float32 and y.shape == x.shape
    scale = np.abs(x).max(-1, keepdims=True) / 127
    # half an int8 step (of the scale rounded to float16), plus the clip of a value whose
    # rounded-down scale puts it a hair past 127 steps
    bound = 0.5 * scale * (1 + 2**-10) + np.abs(x) * 2**-10
    assert (np.abs(y - x) <= bound).all()
    np.testing.assert_array_equal(
        y, stored[..., :32].astype(np.float32) * codec.scales(stored, 32)[..., None]
    )
    assert codec.bytes_per_patch(32) == 34


def test_int8_keeps_an_all_zero_vector_zero():
    x = np.zeros((1, 2, 8), np.float32)
    x[0, 1] = 0.5
    y = Int8Codec().decode(Int8Codec().encode(x), 8)
    assert (y[0, 0] == 0).all() and np.allclose(y[0, 1], 0.5, atol=1e-3)


def test_binary_keeps_signs_and_mean_magnitude():
    x = _patches(n=4, dim=20)  # d not a multiple of 8: the last byte is padded
    codec = BinaryCodec()
    stored = codec.encode(x)
    assert stored.shape == (4, 16, 3 + 2) and codec.bytes_per_patch(20) == 5
    y = codec.decode(stored, 20).astype(np.float32)
    assert (np.sign(y) == np.where(x > 0, 1, -1)).all()
    assert np.allclose(np.abs(y).mean(-1), np.abs(x).mean(-1), rtol=2e-3)


def test_pq_store_decodes_exactly_as_faiss_does(tmp_path):
    x = _patches(n=60)  # 960 patch vectors: pq:8x4 (16 centroids) needs 624
    _write(tmp_path / "idx", x, "pq:8x4")
    gen = Generation.current(tmp_path / "idx")
    store = gen.patches()
    codec = store.codec
    assert isinstance(codec, PQCodec) and codec.spec == "pq:8x4"
    pq = codec.quantizer
    assert (pq.d, pq.M, pq.nbits) == (32, 8, 4)
    rows = np.array([59, 0, 13, 13, 7, 30])
    want = pq.decode(pq.compute_codes(x[rows].reshape(-1, 32))).reshape(len(rows), 16, 32)
    got = store.gather(rows)
    assert got.dtype == np.float32 and got.shape == (6, 16, 32)
    np.testing.assert_array_equal(got, want)
    codes = store.gather_stored(rows)
    assert codes.dtype == np.uint8 and codes.shape == (6, 16, 4)  # 8 codes of 4 bits
    np.testing.assert_array_equal(codes.reshape(-1, 4), pq.compute_codes(x[rows].reshape(-1, 32)))


def test_pq_training_is_seeded(tmp_path):
    x = _patches(n=60)
    _write(tmp_path / "a", x, "pq:8x4")
    _write(tmp_path / "b", x, "pq:8x4", shard_rows=50)  # other shards, same rows
    a = Generation.current(tmp_path / "a").path / PQ_FILE
    b = Generation.current(tmp_path / "b").path / PQ_FILE
    assert a.read_bytes() == b.read_bytes()


def test_opq_store_decodes_exactly_as_faiss_does_and_loses_less_than_pq(tmp_path):
    # Features whose variance sits in a few directions: what a rotation is for.
    rng = np.random.default_rng(5)
    # 640 x 16 vectors: the rotation trains against 256 centroids (9,984 vectors) whatever B is
    low = rng.standard_normal((640, 16, 6)) @ rng.standard_normal((6, 32))
    x = (low + 0.05 * rng.standard_normal((640, 16, 32))).astype(np.float16).astype(np.float32)
    _write(tmp_path / "opq", x, "opq:8x4")
    _write(tmp_path / "pq", x, "pq:8x4")
    store = Generation.current(tmp_path / "opq").patches()
    codec = store.codec
    assert isinstance(codec, OPQCodec) and codec.spec == "opq:8x4"
    rows = np.array([59, 0, 13, 13, 7, 30])
    flat = x[rows].reshape(-1, 32)
    want = codec.index.sa_decode(codec.index.sa_encode(flat)).reshape(len(rows), 16, 32)
    got = store.gather(rows)
    assert got.dtype == np.float32 and got.shape == (6, 16, 32)
    np.testing.assert_array_equal(got, want)
    assert store.gather_stored(rows).shape == (6, 16, 4)  # the bytes of pq:8x4
    every = np.arange(640)
    pq_error = np.square(Generation.current(tmp_path / "pq").patches().gather(every) - x).sum()
    opq_error = np.square(store.gather(every) - x).sum()
    assert opq_error < 0.8 * pq_error
    assert check_generation(store_dir := Generation.current(tmp_path / "opq").path, full=True) == []
    assert json.loads((store_dir / "generation.json").read_text())["patches"]["codec"] == "opq:8x4"


def test_opq_training_is_seeded_and_a_pq_file_is_not_an_opq_one(tmp_path):
    x = _patches(n=640)
    _write(tmp_path / "a", x, "opq:8x4")
    _write(tmp_path / "b", x, "opq:8x4", shard_rows=50)
    a = Generation.current(tmp_path / "a").path / PQ_FILE
    assert a.read_bytes() == (Generation.current(tmp_path / "b").path / PQ_FILE).read_bytes()
    _write(tmp_path / "p", x, "pq:8x4")
    with pytest.raises(InvalidArgumentError, match="256 centroids need at least 9,984"):
        _write(tmp_path / "few", x[:600], "opq:8x4")
    codec = parse_codec("opq:8x4")
    codec.configure(16, 32)
    with pytest.raises(IndexCorruptError, match="cannot be read as a FAISS OPQ rotation"):
        codec.load(Generation.current(tmp_path / "p").path, 32)


def test_plain_pq_is_d_over_8_codes_of_8_bits():
    codec = parse_codec("pq")
    codec.configure(196, 512)
    assert codec.spec == "pq:64" and codec.bytes_per_image(196, 512) == 196 * 64  # 12.25 KiB
    assert 2 * 512 / codec.bytes_per_patch(512) == 16
    odd = parse_codec("pq")
    odd.configure(10, 100)  # 8 does not divide 100: the largest divisor <= 12
    assert odd.spec == "pq:10" and 2 * 100 / odd.bytes_per_patch(100) >= 8


# -- what a generation records ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "dtype", "row_shape", "version"),
    [
        ("int8", "int8", [16, 34], 3),
        ("binary", "uint8", [16, 6], 3),
        ("pq:8x4", "uint8", [16, 4], 3),
    ],
)
def test_a_codec_generation_records_its_codec_and_format_3(
    tmp_path, codec, dtype, row_shape, version
):
    x = _patches()
    _write(tmp_path / "idx", x, codec)
    gen = Generation.current(tmp_path / "idx")
    raw = json.loads((gen.path / "generation.json").read_text())
    assert raw["format_version"] == version == FORMAT_VERSION
    assert read_manifest(tmp_path / "idx").format_version == version
    assert raw["patches"]["codec"] == codec and raw["patches"]["dtype"] == dtype
    assert raw["patches"]["row_shape"] == row_shape
    assert gen.info.patch_codec == codec
    assert gen.info.patch_bytes_per_image == row_shape[0] * row_shape[1] * np.dtype(dtype).itemsize
    if codec.startswith("pq"):
        assert raw["patches"]["codec_file"] == PQ_FILE
        assert PQ_FILE in gen.info.files and PQ_FILE in gen.info.checksums
    else:
        assert "codec_file" not in raw["patches"]
    assert check_generation(gen.path, full=True) == []
    assert gen.patches().gather(np.arange(60)).shape == (60, 16, 32)


def test_fp16_generation_json_is_as_before(tmp_path):
    x = _patches()
    _write(tmp_path / "idx", x, None)
    gen = Generation.current(tmp_path / "idx")
    raw = json.loads((gen.path / "generation.json").read_text())
    assert raw["format_version"] == 1
    assert list(raw["patches"]) == ["n_patches", "dim", "dtype", "shards"]
    assert raw["patches"]["dtype"] == "float16"
    assert gen.info.patch_codec == "fp16" and gen.info.patch_bytes_per_image == 16 * 32 * 2
    np.testing.assert_array_equal(gen.patches().gather(np.arange(60)), x.astype(np.float16))


def test_a_generation_written_before_codecs_reads_as_fp16(tmp_path):
    gen_dir = Path(shutil.copytree(DATA / "gen-000001", tmp_path / "gen-000001"))
    info = read_generation_info(gen_dir)
    assert (
        info.format_version == 1
        and "codec" not in json.loads((gen_dir / "generation.json").read_text())["patches"]
    )
    assert info.patch_codec == "fp16" and info.patch_codec_file is None
    assert info.patch_bytes_per_image == 3 * 4 * 2
    store = PatchStore.open(gen_dir)
    np.testing.assert_array_equal(
        store.gather(np.arange(5)), np.load(DATA / "expected_patches.npy")
    )
    assert check_generation(gen_dir, full=True) == []


def test_an_older_crossrank_refuses_a_codec_index(tmp_path, monkeypatch):
    """Format 3 exists only for codec generations: a reader of format 2 says upgrade."""
    import crossrank.store.layout as layout
    import crossrank.store.manifest as manifest

    _write(tmp_path / "idx", _patches(), "int8")
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    monkeypatch.setattr(layout, "FORMAT_VERSION", 2)
    with pytest.raises(IndexCorruptError, match="upgrade crossrank"):
        read_manifest(tmp_path / "idx")
    gen_dir = next((tmp_path / "idx").glob("gen-*"))
    with pytest.raises(IndexCorruptError, match="upgrade crossrank"):
        read_generation_info(gen_dir)


def test_an_unknown_recorded_codec_says_upgrade(tmp_path):
    _write(tmp_path / "idx", _patches(), "int8")
    gen_dir = next((tmp_path / "idx").glob("gen-*"))
    path = gen_dir / "generation.json"
    raw = json.loads(path.read_text())
    raw["patches"]["codec"] = "zstd-float4"
    path.write_text(json.dumps(raw))
    with pytest.raises(IndexCorruptError, match="zstd-float4.*upgrade crossrank"):
        read_generation_info(gen_dir)


# -- verify ---------------------------------------------------------------------------------------


def test_verify_names_a_damaged_or_missing_pq_quantiser(tmp_path):
    _write(tmp_path / "idx", _patches(), "pq:8x4")
    gen_dir = next((tmp_path / "idx").glob("gen-*"))
    data = bytearray((gen_dir / PQ_FILE).read_bytes())
    data[40] ^= 0x5A
    (gen_dir / PQ_FILE).write_bytes(bytes(data))
    problems = check_generation(gen_dir, full=True)
    assert any(PQ_FILE in p and "damaged" in p for p in problems), problems
    (gen_dir / PQ_FILE).unlink()
    problems = check_generation(gen_dir)
    assert any(PQ_FILE in p and "missing" in p for p in problems), problems
    with pytest.raises(IndexCorruptError, match=PQ_FILE):
        PatchStore.open(gen_dir)


def test_verify_checks_a_codec_shard_against_the_codec(tmp_path):
    _write(tmp_path / "idx", _patches(), "int8")
    gen_dir = next((tmp_path / "idx").glob("gen-*"))
    shard = gen_dir / "patches-000.npy"
    arr = np.load(shard)
    size = shard.stat().st_size
    np.save(shard, arr.view(np.uint8))  # same bytes, the wrong dtype in the header
    assert shard.stat().st_size == size
    problems = check_generation(gen_dir)
    assert any("patches-000.npy has dtype uint8, expected int8" in p for p in problems), problems


# -- keeping the codec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "n"),
    [("pq:8x4", 60), ("opq:8x4", 640)],  # opq's rotation trains on 9,984 vectors at least
)
def test_a_writer_from_a_base_keeps_its_codec_and_quantiser(tmp_path, codec, n):
    root = tmp_path / "idx"
    _write(root, _patches(n=n), codec)
    base = Generation.current(root)
    base_file = (base.path / PQ_FILE).read_bytes()
    trained = base.patches().codec
    more = _patches(n=3, seed=9)
    with GenerationWriter(root, base=base) as w:
        w.link_patches()
        w.patches.append(more)
        assert w.patches.codec.spec == codec and not w.patches.codec.needs_training
        w.link("first_stage.faiss")
        w.link("skipped.parquet")
        ids = np.concatenate([np.asarray(base.ids()), [5000, 5001, 5002]])
        w.write_vectors(np.ones((n + 3, 2), np.float32))
        w.write_ids(ids)
        w.write_metadata(pa.table({"id": pa.array(ids, pa.int64())}))
        w.commit({"encoder": {"model_id": "tiny"}})
    new = Generation.current(root)
    assert new.info.patch_codec == codec
    assert (new.path / PQ_FILE).read_bytes() == base_file  # not retrained
    np.testing.assert_array_equal(  # the new rows are coded by the base's quantiser
        new.patches().gather_stored(np.arange(n, n + 3)), trained.encode(more)
    )
    assert check_generation(new.path, full=True) == []


def test_naming_the_base_codec_reuses_its_trained_quantiser(tmp_path):
    root = tmp_path / "idx"
    _write(root, _patches(n=60), "pq:8x4")
    base = Generation.current(root)
    with GenerationWriter(root, base=base, patch_codec="pq:8x4") as w:
        assert not w.patches.codec.needs_training
        w.link_patches()
        w.abort()


def test_a_writer_refuses_another_codec_than_its_base(tmp_path):
    root = tmp_path / "idx"
    _write(root, _patches(), "int8")
    with GenerationWriter(root, base=Generation.current(root), patch_codec="fp16") as w:
        with pytest.raises(InvalidArgumentError, match="keeps its base's patch codec"):
            w.link_patches()


def test_append_stored_copies_rows_and_checks_them(tmp_path):
    _write(tmp_path / "idx", _patches(), "int8")
    store = Generation.current(tmp_path / "idx").patches()
    rows = store.gather_stored(np.arange(10))
    with GenerationWriter(tmp_path / "other", patch_codec=store.codec) as w:
        with pytest.raises(InvalidArgumentError, match="shape declared"):
            w.patches.append_stored(rows)
        w.patches.append(np.zeros((0, 16, 32), np.float32))
        with pytest.raises(InvalidArgumentError, match="int8"):
            w.patches.append_stored(rows.view(np.uint8))
        w.patches.append_stored(rows)
        assert w.patches.rows == 10
        w.abort()


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zstd", "pq:", "pq:4x9", "pq:0", "opq:0", "opqq", "float8", ""])
def test_an_unknown_codec_is_one_line_that_lists_the_codecs(name):
    with pytest.raises(InvalidArgumentError) as e:
        parse_codec(name)
    message = str(e.value)
    assert "\n" not in message and "--patch-codec" in message
    if name not in ("pq:4x9", "pq:0", "opq:0"):
        assert "fp16" in message and "int8" in message and "pq:MxB" in message
        assert "opq:MxB" in message


def test_an_unknown_codec_leaves_no_folder(tmp_path):
    with pytest.raises(InvalidArgumentError, match="unknown codec"):
        GenerationWriter(tmp_path / "idx", patch_codec="zstd")
    assert not (tmp_path / "idx").exists() or not any(
        p.name.startswith(".gen") for p in (tmp_path / "idx").iterdir()
    )


def test_pq_on_too_few_patches_names_the_smallest_size(tmp_path):
    x = _patches(n=10)  # 160 patch vectors; plain pq (M=4, 256 centroids) needs 9,984
    with pytest.raises(InvalidArgumentError) as e:
        _write(tmp_path / "idx", x, "pq")
    message = str(e.value)
    assert "\n" not in message
    assert "10 images" in message and "9,984" in message and "624 images" in message
    assert "int8" in message
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_pq_m_must_divide_the_patch_dim(tmp_path):
    with pytest.raises(InvalidArgumentError, match="must divide the patch dim 32"):
        _write(tmp_path / "idx", _patches(), "pq:5")

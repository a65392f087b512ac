"""Patch codecs: how a generation stores its per-image patch features, and how they come back.

A codec turns the float patch features of ``b`` images, ``(b, P, d)``, into stored rows
``(b, *row_shape)`` of a fixed dtype (one row per image, so that the shards, the gather and the
row map are the same for every codec), and decodes gathered rows back to ``(k, P, d)`` features
(float32; float16 for fp16, whose rows are returned as stored): the reranker reads the same
shape whatever the codec, and search code never knows it.

========  =========================================  ================  =====================
codec     stored per patch vector                    bytes (d = 128)   bytes (d = 512)
========  =========================================  ================  =====================
fp16      d float16 (the default: today's format)    256               1024
int8      d int8 + a float16 scale, max|x| / 127     130 (2.0x less)   514 (2.0x less)
binary    d sign bits + a float16 scale, mean |x|    18 (14x less)     66 (15.5x less)
pq        M codes of B bits (FAISS product           16 (16x less)     64 (16x less)
          quantisation); plain ``pq`` is M = d/8,
          B = 8
opq       as pq, after a learned rotation (FAISS     16 (16x less)     64 (16x less)
          OPQ): the same bytes, less error
========  =========================================  ================  =====================

``pq:M`` picks M sub-quantisers of 8 bits, ``pq:MxB`` of B bits (1..8); ``opq`` takes the same
forms. PQ (and OPQ's rotation) is trained on a seeded sample of the build's own patch vectors;
the trained quantiser is a file of the generation (:data:`PQ_FILE`, listed with its checksum like
every other file) and ``add``, ``remove`` and ``compact`` reuse it (never retrained, so the codes
already stored stay valid).

A generation records its codec as ``patches.codec`` in ``generation.json`` (absent: fp16, the
layout of every generation written before codecs existed).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import DependencyError, IndexCorruptError, InvalidArgumentError

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "PQ_FILE",
    "PatchCodec",
    "Fp16Codec",
    "Int8Codec",
    "BinaryCodec",
    "PQCodec",
    "OPQCodec",
    "parse_codec",
    "open_codec",
]

DEFAULT_CODEC = "fp16"
#: The spellings ``--patch-codec`` accepts, for the one-line error that lists them.
CODECS = ("fp16", "int8", "binary", "pq", "pq:M", "pq:MxB", "opq", "opq:M", "opq:MxB")
#: The trained quantiser of a ``pq`` generation (``faiss.write_ProductQuantizer``), or of an
#: ``opq`` one (rotation and quantiser, ``faiss.write_index``).
PQ_FILE = "patch_codec.faiss"
#: The seed of the sample PQ is trained on: the same build trains the same quantiser.
PQ_SEED = 0
#: Training vectors per centroid: FAISS's own minimum (``min_points_per_centroid``; it warns
#: below it) and its maximum (``max_points_per_centroid``; it subsamples above it).
_MIN_PER_CENTROID = 39
_MAX_PER_CENTROID = 256
# Rows decoded per step: bounds the float32 temporary (rows x P x d x 4 bytes) to a few MB, which
# also keeps it in cache while the decode writes the output.
_DECODE_ELEMENTS = 1 << 20
_F16 = np.dtype("<f2")
_LIST = (
    "fp16 (the default), int8, binary, pq, pq:M, pq:MxB (M sub-quantisers of B bits, "
    "M dividing the patch dim), or opq, opq:M, opq:MxB (the same after a learned rotation)"
)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise DependencyError(
            "the pq patch codec needs faiss, which is not installed; pip install 'crossrank[cpu]'"
        ) from e
    return faiss


class PatchCodec(ABC):
    """How patch features are stored; see the module docstring for the codecs.

    Attributes:
        name: the family (``fp16``, ``int8``, ``binary``, ``pq``).
        stored_dtype: the dtype of the stored rows.
        params_file: the file of trained parameters in the generation folder, or None.
    """

    name: str = ""
    stored_dtype: np.dtype = _F16
    #: What :meth:`decode` returns: float32 for every codec but fp16 (numpy's float32 -> float16
    #: cast is slower than the decode itself, and the rerankers take either).
    decoded_dtype: np.dtype = np.dtype(np.float32)
    params_file: str | None = None

    @property
    def spec(self) -> str:
        """The canonical spelling recorded in ``generation.json`` (``int8``, ``pq:16``)."""
        return self.name

    def configure(self, n_patches: int, patch_dim: int) -> None:
        """Fix the parameters that depend on ``(P, d)``; refuse a shape the codec cannot store.

        Raises:
            InvalidArgumentError: the codec cannot store ``d``-dim patches.
        """
        del n_patches, patch_dim

    @abstractmethod
    def bytes_per_patch(self, patch_dim: int) -> int:
        """Stored bytes of one patch vector of ``patch_dim`` values."""

    def row_shape(self, n_patches: int, patch_dim: int) -> tuple[int, int]:
        """Shape of one stored row (one image): ``(P, bytes_per_patch / itemsize)``."""
        width = self.bytes_per_patch(patch_dim) // self.stored_dtype.itemsize
        return (int(n_patches), int(width))

    def bytes_per_image(self, n_patches: int, patch_dim: int) -> int:
        """Stored bytes of one image's patches."""
        return int(n_patches) * self.bytes_per_patch(patch_dim)

    @property
    def needs_training(self) -> bool:
        """Whether :meth:`train` must run before :meth:`encode`."""
        return False

    def min_train_vectors(self) -> int:
        """The fewest patch vectors :meth:`train` accepts (0: no training)."""
        return 0

    def max_train_vectors(self) -> int:
        """The size of the sample :meth:`train` is given (0: no training)."""
        return 0

    def check_trainable(self, n_vectors: int, n_patches: int, what: str) -> None:
        """Refuse, in one line, a build with too few patch vectors to train on.

        Args:
            n_vectors: patch vectors available (images x P).
            n_patches: P, to say how many images that takes.
            what: the images counted, for the message (``SOURCE holds 10 files``).

        Raises:
            InvalidArgumentError: fewer than :meth:`min_train_vectors`.
        """
        del n_vectors, n_patches, what

    def train(self, sample: np.ndarray) -> None:
        """Train on a sample of patch vectors, float32 ``(m, d)``; a no-op for most codecs."""
        del sample

    @abstractmethod
    def encode(self, patches: np.ndarray) -> np.ndarray:
        """Stored rows ``(b, *row_shape)`` of float patch features ``(b, P, d)``."""

    @abstractmethod
    def _decode_block(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Decode a few stored rows into ``out``, float32 ``(b, P, d)``."""

    def decode(
        self, stored: np.ndarray, patch_dim: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``(k, P, d)`` features of stored rows ``(k, *row_shape)``, decoded a few rows at a
        time (the temporaries stay small and in cache).

        Args:
            stored: the stored rows.
            patch_dim: d.
            out: a C-contiguous :attr:`decoded_dtype` ``(k, P, d)`` array to decode into; a new
                one when None.

        Returns:
            ``out``: float32 (float16 for fp16).
        """
        k, n_patches = int(stored.shape[0]), int(stored.shape[1])
        if out is None:
            out = np.empty((k, n_patches, patch_dim), self.decoded_dtype)
        step = max(1, _DECODE_ELEMENTS // max(1, n_patches * patch_dim))
        for i0 in range(0, k, step):
            self._decode_block(stored[i0 : i0 + step], out[i0 : i0 + step])
        return out

    def save(self, directory: Path) -> None:
        """Write the trained parameters to ``directory / params_file`` (nothing for most)."""
        del directory

    def load(self, directory: Path, patch_dim: int) -> None:
        """Read the trained parameters from ``directory / params_file`` (nothing for most).

        Raises:
            IndexCorruptError: the file is missing, unreadable or does not fit ``patch_dim``.
        """
        del directory, patch_dim

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class Fp16Codec(PatchCodec):
    """float16 patch features as they are: today's format and the default."""

    name = "fp16"
    stored_dtype = _F16
    decoded_dtype = _F16

    def bytes_per_patch(self, patch_dim: int) -> int:
        return 2 * int(patch_dim)

    def encode(self, patches: np.ndarray) -> np.ndarray:
        return np.asarray(patches).astype(_F16, copy=False)

    def _decode_block(self, stored: np.ndarray, out: np.ndarray) -> None:
        out[...] = stored

    def decode(
        self, stored: np.ndarray, patch_dim: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if out is None:
            return np.asarray(stored, dtype=_F16)
        out[...] = stored
        return out


class Int8Codec(PatchCodec):
    """Symmetric int8 with one float16 scale per patch vector: ``x ~ q * scale``.

    ``scale = max|x| / 127`` (rounded to float16 first, and ``q`` computed with the rounded scale,
    so that decoding is exactly ``q * scale``): every value is within ``scale / 2`` of its
    original. A row holds the d int8 values, then the
    scale's two bytes: ``d + 2`` bytes per patch vector. A float16 scale, not float32: its relative
    error (2^-11) is 16x below the int8 step's (1/254), and it saves 2 bytes per vector.
    """

    name = "int8"
    stored_dtype = np.dtype(np.int8)

    def bytes_per_patch(self, patch_dim: int) -> int:
        return int(patch_dim) + 2

    def encode(self, patches: np.ndarray) -> np.ndarray:
        x = np.asarray(patches, dtype=np.float32)  # (b, P, d)
        b, n_patches, d = x.shape
        scale = (np.abs(x).max(axis=-1) / 127.0).astype(_F16)  # (b, P)
        s = scale.astype(np.float32)[..., None]  # (b, P, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(x / s), 0.0)  # an all-zero vector (or one below fp16) -> 0
        out = np.empty((b, n_patches, d + 2), np.int8)
        out[..., :d] = np.clip(q, -127, 127)
        out[..., d:] = np.ascontiguousarray(scale).view(np.int8).reshape(b, n_patches, 2)
        return out

    def scales(self, stored: np.ndarray, patch_dim: int) -> np.ndarray:
        """The float16 scales ``(k, P)`` of stored rows."""
        tail = np.ascontiguousarray(stored[..., patch_dim : patch_dim + 2])
        return tail.view(_F16)[..., 0]

    def _decode_block(self, stored: np.ndarray, out: np.ndarray) -> None:
        d = out.shape[-1]
        scale = self.scales(stored, d).astype(np.float32)[..., None]  # (b, P, 1)
        # One pass: the ufunc casts the int8 values in its own small buffers.
        np.multiply(stored[..., :d], scale, out=out, dtype=np.float32)


class BinaryCodec(PatchCodec):
    """One sign bit per value and a float16 scale per patch vector: ``x ~ sign(x) * mean|x|``.

    ``mean|x|`` is the scale that minimises the squared error of a sign code. ``ceil(d / 8) + 2``
    bytes per patch vector (like binarised ColPali vectors, with a scale kept for the reranker).
    """

    name = "binary"
    stored_dtype = np.dtype(np.uint8)

    def bytes_per_patch(self, patch_dim: int) -> int:
        return math.ceil(int(patch_dim) / 8) + 2

    def encode(self, patches: np.ndarray) -> np.ndarray:
        x = np.asarray(patches, dtype=np.float32)
        b, n_patches, d = x.shape
        nb = math.ceil(d / 8)
        out = np.empty((b, n_patches, nb + 2), np.uint8)
        out[..., :nb] = np.packbits(x > 0, axis=-1, bitorder="little")
        scale = np.abs(x).mean(axis=-1).astype(_F16)
        out[..., nb:] = np.ascontiguousarray(scale).view(np.uint8).reshape(b, n_patches, 2)
        return out

    def _decode_block(self, stored: np.ndarray, out: np.ndarray) -> None:
        d = out.shape[-1]
        nb = math.ceil(d / 8)
        bits = np.unpackbits(stored[..., :nb], axis=-1, count=d, bitorder="little")
        scale = np.ascontiguousarray(stored[..., nb : nb + 2]).view(_F16).astype(np.float32)
        np.multiply(bits, 2 * scale, out=out, dtype=np.float32)  # {0, 2s}, then {-s, s}
        out -= scale


class PQCodec(PatchCodec):
    """FAISS product quantisation: each patch vector is M codes of B bits.

    Args:
        m: sub-quantisers; None picks the largest divisor of d that is at most d / 8 (M = d / 8
            when 8 divides d: 16x fewer bytes than fp16).
        nbits: bits per code, 1..8 (2^B centroids per sub-quantiser).
    """

    name = "pq"
    stored_dtype = np.dtype(np.uint8)
    params_file = PQ_FILE

    def __init__(self, m: int | None = None, nbits: int = 8) -> None:
        self.m = m
        self.nbits = int(nbits)
        self._pq: Any = None
        self._dim: int | None = None

    @property
    def spec(self) -> str:
        if self.m is None:
            return "pq"
        return f"pq:{self.m}" if self.nbits == 8 else f"pq:{self.m}x{self.nbits}"

    @staticmethod
    def default_m(patch_dim: int) -> int:
        """The largest divisor of d that is at most ``max(1, d // 8)``."""
        top = max(1, int(patch_dim) // 8)
        return max(m for m in range(1, top + 1) if patch_dim % m == 0)

    def configure(self, n_patches: int, patch_dim: int) -> None:
        if self.m is None:
            self.m = self.default_m(patch_dim)
        if patch_dim % self.m:
            raise InvalidArgumentError(
                f"--patch-codec {self.spec}: M = {self.m} sub-quantisers must divide the patch "
                f"dim {patch_dim}; choose one of "
                f"{', '.join(str(m) for m in range(1, patch_dim + 1) if patch_dim % m == 0)}, "
                "or plain pq"
            )
        if self._dim is not None and self._dim != patch_dim:
            raise InvalidArgumentError(
                f"the pq codec was trained on {self._dim}-dim patches, got {patch_dim}-dim ones"
            )
        self._dim = int(patch_dim)

    def _code_size(self) -> int:
        if self.m is None:
            raise InvalidArgumentError("the pq codec needs configure(P, d) before use")
        return math.ceil(self.m * self.nbits / 8)

    def bytes_per_patch(self, patch_dim: int) -> int:
        if self.m is None:
            return math.ceil(self.default_m(patch_dim) * self.nbits / 8)
        return self._code_size()

    @property
    def needs_training(self) -> bool:
        return self._pq is None

    @property
    def trained(self) -> bool:
        """Whether the quantiser is trained (or was loaded)."""
        return self._pq is not None

    @property
    def quantizer(self) -> Any:
        """The ``faiss.ProductQuantizer`` (None before :meth:`train` or :meth:`load`)."""
        return self._pq

    def min_train_vectors(self) -> int:
        return _MIN_PER_CENTROID * (1 << self.nbits)

    def max_train_vectors(self) -> int:
        """The sample size: FAISS subsamples anything larger (256 vectors per centroid)."""
        return _MAX_PER_CENTROID * (1 << self.nbits)

    def check_trainable(self, n_vectors: int, n_patches: int, what: str) -> None:
        need = self.min_train_vectors()
        if n_vectors >= need:
            return
        images = math.ceil(need / max(1, n_patches))
        raise InvalidArgumentError(
            f"--patch-codec {self.spec} cannot be trained on {what}: {n_vectors:,} patch vectors, "
            f"and {need // _MIN_PER_CENTROID} centroids need at least {need:,} "
            f"({_MIN_PER_CENTROID} each), "
            f"that is {images:,} images of {n_patches} patches; index more images, or use "
            f"--patch-codec int8 (no training), or fewer bits (pq:MxB trains on "
            f"{_MIN_PER_CENTROID} x 2^B vectors)"
        )

    def train(self, sample: np.ndarray) -> None:
        x = np.ascontiguousarray(sample, dtype=np.float32)
        if x.ndim != 2:
            raise InvalidArgumentError(f"{self.name} trains on (m, d) vectors, got shape {x.shape}")
        self.configure(0, int(x.shape[1]))
        self.check_trainable(int(x.shape[0]), 1, f"{x.shape[0]:,} vectors")
        self._fit(x)

    def _fit(self, x: np.ndarray) -> None:
        """Train on the checked ``(m, d)`` float32 sample."""
        assert self.m is not None
        pq = _import_faiss().ProductQuantizer(int(x.shape[1]), int(self.m), self.nbits)
        pq.cp.seed = 1234 + PQ_SEED  # FAISS's own default, named: the same sample, the same PQ
        pq.train(x)
        self._pq = pq

    def _require(self) -> Any:
        if self._pq is None:
            raise InvalidArgumentError(
                f"the {self.name} codec is not trained; train() or load() it first"
            )
        return self._pq

    def encode(self, patches: np.ndarray) -> np.ndarray:
        pq = self._require()
        x = np.asarray(patches, dtype=np.float32)
        b, n_patches, d = x.shape
        if b == 0:
            return np.zeros((0, n_patches, pq.code_size), np.uint8)
        codes = self._encode_flat(np.ascontiguousarray(x.reshape(b * n_patches, d)))
        return codes.reshape(b, n_patches, -1)

    def _encode_flat(self, x: np.ndarray) -> np.ndarray:
        """``(m, d)`` float32 -> ``(m, code_size)`` uint8."""
        return self._pq.compute_codes(x)

    def _decode_block(self, stored: np.ndarray, out: np.ndarray) -> None:
        self.decode(stored, out.shape[-1], out)

    def decode(
        self, stored: np.ndarray, patch_dim: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        # FAISS writes every row straight into `out`, in one call (it splits the rows between
        # its threads), so there is no temporary to keep small.
        self._require()
        k, n_patches, cs = stored.shape
        if out is None:
            out = np.empty((k, n_patches, patch_dim), np.float32)
        if k:
            codes = np.ascontiguousarray(stored).reshape(k * n_patches, cs)
            assert out.dtype == np.float32 and out.flags.c_contiguous
            self._decode_flat(codes, out.reshape(k * n_patches, patch_dim))
        return out

    def _decode_flat(self, codes: np.ndarray, out: np.ndarray) -> None:
        """``(m, code_size)`` uint8 -> ``out`` ``(m, d)`` float32, in place."""
        faiss = _import_faiss()
        self._pq.decode_c(faiss.swig_ptr(codes), faiss.swig_ptr(out), codes.shape[0])

    def save(self, directory: Path) -> None:
        self._write(str(Path(directory) / PQ_FILE))

    def _write(self, path: str) -> None:
        _import_faiss().write_ProductQuantizer(self._require(), path)

    #: What :data:`PQ_FILE` holds, for the messages.
    _file_holds = "product quantiser"

    def load(self, directory: Path, patch_dim: int) -> None:
        path = Path(directory) / PQ_FILE
        if not path.is_file():
            raise IndexCorruptError(
                f"{path} is missing: the {self.name} patch codec's {self._file_holds}; run "
                "`crossrank verify`"
            )
        try:
            pq = self._read(str(path))
        except RuntimeError as e:
            raise IndexCorruptError(
                f"{path} cannot be read as a FAISS {self._file_holds} "
                f"({str(e).splitlines()[0]}); run `crossrank verify`"
            ) from e
        want = (patch_dim, self.m, self.nbits)
        if (pq.d, pq.M, pq.nbits) != want:
            raise IndexCorruptError(
                f"{path} holds a product quantiser of d={pq.d}, M={pq.M}, {pq.nbits} bits; "
                f"generation.json records d={patch_dim}, codec {self.spec}; run `crossrank verify`"
            )
        self._dim = int(patch_dim)

    def _read(self, path: str) -> Any:
        """Read the file into this codec; return its ``faiss.ProductQuantizer``.

        Raises:
            RuntimeError: FAISS cannot read it as what this codec stores.
        """
        self._pq = _import_faiss().read_ProductQuantizer(path)
        return self._pq


class OPQCodec(PQCodec):
    """Product quantisation after a learned rotation (FAISS ``OPQ{M},PQ{M}xB``).

    The same codes and bytes as :class:`PQCodec`; the rotation (``OPQMatrix``, trained with the
    quantiser on the same sample) first spreads the variance evenly over the M sub-spaces, so
    the codes lose less: on the demo encoder's patches the relative squared error of ``opq`` is
    about a fifth of ``pq``'s (``research/pq_rotation.py``). Decoding adds one ``d x d``
    rotation per patch vector. The trained pair is one FAISS index file (:data:`PQ_FILE`).
    """

    name = "opq"
    _file_holds = "OPQ rotation and product quantiser"

    def __init__(self, m: int | None = None, nbits: int = 8) -> None:
        super().__init__(m, nbits)
        self._index: Any = None  # the trained IndexPreTransform(OPQMatrix, IndexPQ)

    @property
    def spec(self) -> str:
        return "o" + super().spec

    @property
    def index(self) -> Any:
        """The ``faiss.IndexPreTransform`` (None before :meth:`train` or :meth:`load`)."""
        return self._index

    def min_train_vectors(self) -> int:
        """FAISS trains the rotation against 8-bit codes whatever B is: 256 centroids' worth."""
        return _MIN_PER_CENTROID * (1 << max(8, self.nbits))

    def max_train_vectors(self) -> int:
        return _MAX_PER_CENTROID * (1 << max(8, self.nbits))

    def _fit(self, x: np.ndarray) -> None:
        faiss = _import_faiss()
        index = faiss.index_factory(int(x.shape[1]), f"OPQ{self.m},PQ{self.m}x{self.nbits}")
        faiss.downcast_index(index.index).pq.cp.seed = 1234 + PQ_SEED
        index.train(x)
        self._index, self._pq = index, faiss.downcast_index(index.index).pq

    def _encode_flat(self, x: np.ndarray) -> np.ndarray:
        return self._index.sa_encode(x)

    def _decode_flat(self, codes: np.ndarray, out: np.ndarray) -> None:
        self._index.sa_decode(codes, out)

    def _write(self, path: str) -> None:
        self._require()
        _import_faiss().write_index(self._index, path)

    def _read(self, path: str) -> Any:
        faiss = _import_faiss()
        index = faiss.read_index(path)
        inner = (
            faiss.downcast_index(index.index)
            if isinstance(index, faiss.IndexPreTransform)
            else None
        )
        pq = getattr(inner, "pq", None)
        if pq is None:
            raise RuntimeError(f"a {type(index).__name__}, not an OPQ rotation and a PQ")
        self._index, self._pq = index, pq
        return pq


_PQ_RE = re.compile(r"^(o?pq)(?::(\d+)(?:x(\d+))?)?$")


def parse_codec(spec: str | PatchCodec | None) -> PatchCodec:
    """The codec a ``--patch-codec`` value names (untrained).

    Args:
        spec: ``fp16``, ``int8``, ``binary``, ``pq``, ``pq:M``, ``pq:MxB``, or ``opq`` with the
            same forms; None is fp16; a :class:`PatchCodec` is returned as it is.

    Raises:
        InvalidArgumentError: another name, in one line that lists the codecs.
    """
    if isinstance(spec, PatchCodec):
        return spec
    text = DEFAULT_CODEC if spec is None else str(spec).strip().lower()
    if text == "fp16":
        return Fp16Codec()
    if text == "int8":
        return Int8Codec()
    if text == "binary":
        return BinaryCodec()
    m = _PQ_RE.match(text)
    if m is not None:
        sub = int(m.group(2)) if m.group(2) else None
        nbits = int(m.group(3)) if m.group(3) else 8
        if (sub is not None and sub < 1) or not 1 <= nbits <= 8:
            raise InvalidArgumentError(
                f"--patch-codec {spec!r}: M must be >= 1 and B in 1..8 ({m.group(1)}:MxB); got "
                f"M={sub}, B={nbits}"
            )
        return (OPQCodec if m.group(1) == "opq" else PQCodec)(sub, nbits)
    raise InvalidArgumentError(f"--patch-codec: unknown codec {spec!r}; choose one of {_LIST}")


def open_codec(spec: str, gen_dir: Path | str, n_patches: int, patch_dim: int) -> PatchCodec:
    """The codec a generation records, with its trained parameters loaded from ``gen_dir``.

    Raises:
        IndexCorruptError: the recorded codec is unknown or its parameters are missing or damaged.
    """
    try:
        codec = parse_codec(spec)
        if patch_dim > 0:
            codec.configure(n_patches, patch_dim)
    except InvalidArgumentError as e:
        raise IndexCorruptError(
            f"{gen_dir} records patch codec {spec!r}, which this crossrank cannot read ({e}); "
            "upgrade crossrank (pip install -U crossrank)"
        ) from e
    if codec.params_file is not None and patch_dim > 0:
        codec.load(Path(gen_dir), patch_dim)
    return codec

"""Listing the images to index: a folder walked recursively, or a Parquet / CSV manifest."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.errors import SourceError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "RESERVED_COLUMNS",
    "Source",
    "SourceItem",
    "SourceKind",
    "discover",
]

logger = logging.getLogger(__name__)

# Matched case-insensitively against the file suffix.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
)
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".parquet", ".csv"})
# Metadata columns crossrank fills itself; a manifest may not bring its own (DuckDB column names are
# case-insensitive, so neither may it bring "Width").
RESERVED_COLUMNS: tuple[str, ...] = ("id", "path", "sha256", "width", "height", "bytes", "mtime")

_PANDAS_INDEX = re.compile(r"__index_level_\d+__")
_SOURCE_HINT = "give a folder of images or a .parquet/.csv manifest with a `path` column"


class SourceKind(StrEnum):
    """Where the list of images came from."""

    FOLDER = "folder"
    MANIFEST = "manifest"


@dataclass(frozen=True)
class SourceItem:
    """One image to index.

    Attributes:
        path: absolute, lexically normalised path of the image file (symlinks are not resolved).
        extra: the manifest's other columns for this row, as Python values; ``{}`` for folders.
    """

    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """The images a SOURCE names, in the order ids are given: sorted by ``str(path)``.

    That order is the one DuckDB's ``ORDER BY path`` gives (both compare code points), so id order
    and path order agree in the metadata.

    Attributes:
        kind: folder or manifest.
        root: the absolute SOURCE: the folder, or the manifest file.
        items: one :class:`SourceItem` per image, sorted by path.
        extra_schema: Arrow schema of the manifest's own columns (every column but ``path``, types
            kept: a Parquet int32 stays int32); an empty schema if it has none; ``None`` for a
            folder.
    """

    kind: SourceKind
    root: Path
    items: list[SourceItem]
    extra_schema: pa.Schema | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SourceItem]:
        return iter(self.items)


def discover(source: str | os.PathLike[str]) -> Source:
    """List the images of a folder (recursively) or of a manifest.

    A folder is walked recursively; a file counts when its suffix is in :data:`IMAGE_EXTENSIONS`,
    compared case-insensitively. Hidden folders and files (a name starting with ``.``: ``.git``,
    macOS ``._photo.jpg`` resource forks) are skipped; symlinked files are listed, symlinked
    folders are not followed (no cycles).

    A manifest is a ``.parquet`` or ``.csv`` file with a ``path`` column; relative paths resolve
    against the manifest's folder, not the working directory. Every other column becomes metadata
    with its Arrow type (CSV types are inferred by ``pyarrow.csv``). Files a manifest names are not
    checked here: a missing one is skipped at decode time with the reason "file not found".

    Args:
        source: a folder, or a ``.parquet`` / ``.csv`` manifest.

    Returns:
        The :class:`Source`, items sorted by path.

    Raises:
        SourceError: SOURCE does not exist or is another kind of file; a folder holds no image; a
            manifest cannot be read, has no rows, has no ``path`` column (or one that does not hold
            strings), a row with an empty path, the same image twice, duplicate column names, or a
            column named like a reserved metadata column (:data:`RESERVED_COLUMNS`).

    Example:
        >>> src = discover("photos/")
        >>> src.kind, len(src.items), src.items[0].path
        ('folder', 1204, PosixPath('/home/me/photos/2019/a.jpg'))
    """
    root = Path(os.path.abspath(os.fspath(source)))
    if root.is_dir():
        return _discover_folder(root)
    if not root.exists():
        raise SourceError(f"SOURCE {root} does not exist; {_SOURCE_HINT}")
    if root.suffix.lower() in MANIFEST_EXTENSIONS:
        return _discover_manifest(root)
    what = "an image file" if root.suffix.lower() in IMAGE_EXTENSIONS else "a file"
    raise SourceError(
        f"SOURCE {root} is {what}, not a folder or a manifest; {_SOURCE_HINT}"
        + (" (put a single image in a folder to index it)" if what == "an image file" else "")
    )


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _discover_folder(root: Path) -> Source:
    def on_error(err: OSError) -> None:
        # An unreadable sub-folder loses its images; say so rather than abort the whole build.
        logger.warning("cannot list %s (%s); its images are skipped", err.filename, err.strerror)

    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and _is_image_name(f)
        )
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise SourceError(
            f"no images found in {root} (looked recursively for {exts}, any case, "
            "outside hidden folders); point SOURCE at a folder of images or a manifest"
        )
    paths.sort()
    return Source(
        kind=SourceKind.FOLDER,
        root=root,
        items=[SourceItem(path=Path(p)) for p in paths],
        extra_schema=None,
    )


def _read_manifest_table(manifest: Path) -> pa.Table:
    import pyarrow as pa

    suffix = manifest.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(manifest)
        import pyarrow.csv as pcsv

        # `path` stays a string even when every name looks like a number ("0001", "2019").
        return pcsv.read_csv(
            manifest,
            convert_options=pcsv.ConvertOptions(column_types={"path": pa.string()}),
        )
    except (pa.ArrowException, OSError, ValueError) as e:
        kind = "Parquet" if suffix == ".parquet" else "CSV"
        detail = " ".join(str(e).split())[:200]
        raise SourceError(
            f"cannot read manifest {manifest} as {kind} ({detail}); "
            f"it must be a {kind} file with a `path` column"
        ) from e


def _discover_manifest(manifest: Path) -> Source:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_manifest_table(manifest)
    # pandas writes a non-default index as an extra column; it is not the user's metadata.
    table = table.select([n for n in table.column_names if not _PANDAS_INDEX.fullmatch(n)])
    names = table.column_names

    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in seen:
            raise SourceError(
                f"manifest {manifest} has the column name {name!r} twice "
                f"(as {seen[name.lower()]!r} and {name!r}; names are compared ignoring case); "
                "rename one of them"
            )
        seen[name.lower()] = name
    if "path" not in names:
        raise SourceError(
            f"manifest {manifest} has no `path` column (columns: {', '.join(names) or 'none'}); "
            "add a column named `path` holding each image's path, relative to the manifest's "
            "folder or absolute"
        )
    for name in names:
        if name != "path" and name.lower() in RESERVED_COLUMNS:
            raise SourceError(
                f"manifest {manifest} has a column {name!r}, a name crossrank reserves for its own "
                f"metadata ({', '.join(RESERVED_COLUMNS)}); rename that column"
            )
    if table.num_rows == 0:
        raise SourceError(f"manifest {manifest} has no rows; list at least one image in `path`")

    column = table.column("path")
    if not (
        pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
        or pa.types.is_dictionary(column.type)
    ):
        raise SourceError(
            f"manifest {manifest}: the `path` column must hold strings, got {column.type}; "
            "store paths as text"
        )
    try:
        raw_paths = pc.cast(column, pa.string()).to_pylist()
    except pa.ArrowException as e:
        raise SourceError(
            f"manifest {manifest}: the `path` column must hold strings, got {column.type}"
        ) from e

    base = manifest.parent
    resolved: list[str] = []
    first_row: dict[str, int] = {}
    for row, raw in enumerate(raw_paths, start=1):
        if raw is None or not raw.strip():
            raise SourceError(
                f"manifest {manifest}: row {row} has an empty `path`; every row must name an image"
            )
        p = os.path.abspath(os.path.join(base, raw))
        if p in first_row:
            raise SourceError(
                f"manifest {manifest} lists {p} twice (rows {first_row[p]} and {row}); each image "
                "must appear once (put several captions of one image in one row)"
            )
        first_row[p] = row
        resolved.append(p)

    extra_table = table.drop_columns(["path"])
    extra_schema = extra_table.schema.remove_metadata()
    extras = extra_table.to_pylist() if extra_table.num_columns else [{} for _ in resolved]
    order = sorted(range(len(resolved)), key=resolved.__getitem__)
    items = [SourceItem(path=Path(resolved[i]), extra=extras[i]) for i in order]
    return Source(kind=SourceKind.MANIFEST, root=manifest, items=items, extra_schema=extra_schema)

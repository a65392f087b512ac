"""``crossrank info`` and ``verify``: look at an index and check it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.render import console, err_console, print_table, progress_bar
from crossrank.errors import CrossrankError


@app.command()
@_friendly_errors
def info(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    skipped: Annotated[
        bool, typer.Option("--skipped", help="List the files the build skipped, with reasons.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe an index: counts, model, first stage; or list skipped files."""
    from crossrank.encoders.describe import describe_model
    from crossrank.shards import open_index

    idx = open_index(index, device="cpu")
    if skipped:
        rows = idx.skipped().to_pylist()
        if as_json:
            _print_json(rows)
            return
        table = Table("path", "reason", title=f"{len(rows)} skipped files", title_justify="left")
        for row in rows:  # Text: a path or reason is printed as it is, never read as markup
            table.add_row(Text(str(row["path"])), Text(str(row["reason"])))
        print_table(table)
        return
    facts = idx.info()
    model = describe_model(facts["encoder"])
    if as_json:
        _print_json({**facts, "encoder_description": model.to_dict()})
        return
    table = Table(show_header=False, box=None)
    enc, fs = facts["encoder"], facts["first_stage"]
    model_type = f" ({model.model_type})" if model.model_type else ""
    for key, value in (
        ("index", facts["path"]),
        ("generation", facts["generation"]),
        ("images", facts["counts"].get("images")),
        ("skipped", facts["counts"].get("skipped")),
        ("removed", f"{facts.get('tombstones', 0)} (space reclaimed by `crossrank compact`)"),
        ("model", f"{model.model_id}{model_type}"),
        (
            "dims",
            f"pooled {enc.get('dim')}, patches {facts['patches']['n_patches']} x "
            f"{facts['patches']['dim']} "
            f"{facts['patch_codec']} ({_size(facts['patch_bytes_per_image'])} per image)",
        ),
        (
            "first stage",
            f"{fs.get('factory')} (ntotal {fs.get('ntotal')}, nprobe {fs.get('nprobe')})",
        ),
        ("metadata", ", ".join(facts["metadata_columns"])),
        *_shard_rows(facts),
        ("updated", facts["updated_at"]),
    ):
        table.add_row(Text(key, style="bold"), Text(str(value)))
    print_table(table)
    if model.note:
        console.print(Text(f"note: {model.note}", style="yellow"), soft_wrap=True)


def _shard_rows(facts: dict) -> list[tuple[str, str]]:
    """The rows ``info`` adds for a sharded index: the routing rule and each shard's images."""
    shards = facts.get("shards")
    if not shards:
        return []
    n = len(shards)
    rows = [("shards", f"{n} (the image with id i lives in shard i % {n})")]
    for shard in shards:
        rows.append(
            (
                f"  shard {shard['shard']}",
                f"{shard['images']} images, generation {shard['generation']}, {shard['path']}",
            )
        )
    return rows


@app.command()
@_friendly_errors
def verify(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Check structure and sizes only (fast at any size); without it every byte of "
            "every file is also compared with the sha256 recorded when it was written.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check that the files of an index are intact and agree; exit 1 on a problem."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from crossrank.api.verify import verify_report
    from crossrank.shards.layout import is_sharded, read_shards_manifest
    from crossrank.shards.verify import bytes_to_hash_sharded, verify_sharded_report
    from crossrank.store import read_manifest
    from crossrank.store.check import bytes_to_hash

    full = not quick
    sharded = is_sharded(index)
    try:
        if not full:
            total = 0
        elif sharded:
            total = bytes_to_hash_sharded(index)
        else:
            total = bytes_to_hash(read_manifest(index).generation_path)
    except CrossrankError:
        total = 0  # no index (verify_report says so) or a damaged manifest (its first problem)
    columns = (
        TextColumn("[bold]hashing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # Not Index.open: a damaged index (the case verify is for) must be diagnosed, not refused.
    with progress_bar(*columns, disable=as_json or not total, transient=True) as update:
        pending = [0]

        def progress(n: int) -> None:
            pending[0] += n
            if pending[0] >= 1 << 24:  # a redraw per 16 MiB, not per 1 MiB chunk
                update(advance=pending[0], total=total)
                pending[0] = 0

        report = (verify_sharded_report if sharded else verify_report)(
            index, full=full, progress=progress
        )
    try:
        manifest = read_shards_manifest(index) if sharded else read_manifest(index)
        images, generation = manifest.counts.get("images"), manifest.generation
    except CrossrankError:  # a damaged manifest: already the first problem
        images = generation = None
    if as_json:
        _print_json(
            {
                "ok": report.ok,
                "images": images,
                "generation": generation,
                "mode": "full" if full else "quick",
                "problems": report.problems,
                "notes": report.notes,
                "files_hashed": report.files_hashed,
                "bytes_hashed": report.bytes_hashed,
            }
        )
        if report.problems:
            raise typer.Exit(1)
        return
    for problem in report.problems[:_SHOWN]:  # one line each; escape: paths may hold brackets
        err_console.print(f"[bold red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if len(report.problems) > _SHOWN:
        err_console.print(f"... and {len(report.problems) - _SHOWN} more problems (see --json)")
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    if full and report.files_hashed:
        checked = (
            f"every file matches its recorded sha256 ({report.files_hashed} files, "
            f"{_size(report.bytes_hashed)}), first stage, patch store and metadata agree"
        )
    elif full:
        checked = "first stage, patch store and metadata agree (contents not hashed: see note)"
    else:
        checked = (
            "first stage, patch store and metadata agree (quick: structure and sizes; "
            "run without --quick to check every byte)"
        )
    console.print(
        f"[green]ok[/]: {images} images, generation {generation}, {checked}",
        highlight=False,
        soft_wrap=True,
    )


_SHOWN = 20  # problems printed before "... and N more"


def _size(n: int) -> str:
    """``12.3 MB``: a byte count for people (decimal units, like the progress bar)."""
    if n < 1000:
        return f"{n} bytes"
    x = float(n)
    for unit in ("kB", "MB", "GB"):
        x /= 1000
        if x < 1000:
            return f"{x:.1f} {unit}"
    return f"{x / 1000:.1f} TB"


# -- demo -------------------------------------------------------------------------------------

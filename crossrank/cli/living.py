"""``crossrank add``, ``remove`` and ``compact``: changing an index in place, one generation each.

Thin shells over :mod:`crossrank.write`; each holds the index's writer lock while it works, so a
second writer gets one red line naming the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from crossrank.cli.app import EXIT_INTERRUPTED, _friendly_errors, _print_json, app, parse_ids
from crossrank.cli.render import console, err_console, progress_bar
from crossrank.device import Device

__all__ = ["add", "remove", "compact", "stop_on_ctrl_c"]


@contextmanager
def stop_on_ctrl_c(index: Path) -> Iterator[None]:
    """Ctrl-C stops a writing command with one line and exit code 130.

    By the time the KeyboardInterrupt gets here, the generation writer has removed its temporary
    folder and the writer lock is released; the last committed generation was never touched.
    """
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(
            f"[bold yellow]interrupted:[/] stopped; the last committed generation of "
            f"{escape(str(index))} is intact and its writer lock is released",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _phase_columns() -> list:
    """The progress columns of a writer that reports phases (hashing, indexing, ...)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return [
        TextColumn("[bold]{task.fields[phase]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]


def _phase_progress(update: Callable[..., None]) -> Callable[[str, int, int], None]:
    """A ``progress(phase, done, total)`` that drives one bar, relabelled per phase."""
    started: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        t0 = started.setdefault(phase, now)
        rate = f"{done / (now - t0):,.0f} img/s" if now - t0 > 0.5 and phase != "hashing" else ""
        update(completed=done, total=total, phase=phase, rate=rate)

    return progress


@app.command()
@_friendly_errors
def add(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of images (recursive) or a .parquet/.csv manifest with a `path` column."
        ),
    ],
    index: Annotated[Path, typer.Option("--index", "-i", help="The index directory to add to.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder forward pass.")] = 64,
    device: Annotated[Device, typer.Option(help="Where to encode.")] = Device.AUTO,
    workers: Annotated[int, typer.Option(min=1, help="Image decoding and hashing threads.")] = 4,
    rehash: Annotated[
        bool, typer.Option(help="Hash every file, even those whose size and mtime match the index.")
    ] = False,
    retry_skipped: Annotated[
        bool,
        typer.Option(
            "--retry-skipped",
            help="Try again the files the index skipped before (e.g. after fixing them).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index the files of SOURCE the index lacks (matched by content); moved files keep their id."""
    from crossrank.shards import add_sharded, is_sharded
    from crossrank.write import add_images

    add_to = add_sharded if is_sharded(index) else add_images
    columns = _phase_columns()
    with (
        stop_on_ctrl_c(index),
        progress_bar(*columns, disable=as_json, phase="", rate="") as update,
    ):
        report = add_to(
            source,
            index,
            batch_size=batch_size,
            device=device.value,
            workers=workers,
            rehash=rehash,
            retry_skipped=retry_skipped,
            progress=_phase_progress(update),
        )
    if as_json:
        _print_json(report.to_dict())
        return
    where = escape(str(report.index_dir))
    still = (
        f", {report.still_skipped} skipped before (--retry-skipped tries them again)"
        if report.still_skipped
        else ""
    )
    if not report.committed:
        console.print(
            f"[green]nothing to add[/]: {report.unchanged} files already indexed"
            + (f", {report.duplicates} duplicates" if report.duplicates else "")
            + (f", {report.skipped} undecodable" if report.skipped else "")
            + still
            + f" -> {where} (generation {report.generation}, {report.images} images)",
            highlight=False,
        )
        return
    console.print(
        f"[green]added {report.added}[/] images, moved {report.moved}, replaced "
        f"{report.replaced}, unchanged {report.unchanged}, duplicates "
        f"{report.duplicates}, skipped {report.skipped}{still}, in {report.seconds:.1f} s -> "
        f"{where} (generation {report.generation}, {report.images} images)",
        highlight=False,
    )
    if report.skipped:
        console.print(
            f"[yellow]{report.skipped} files skipped:[/] list them with "
            f"`crossrank info {where} --skipped`",
            highlight=False,
        )


@app.command()
@_friendly_errors
def remove(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    where: Annotated[
        str | None,
        typer.Option(
            help=(
                "DuckDB SQL filter over metadata columns selecting the images to remove, "
                "e.g. \"path LIKE '%/tmp/%'\"."
            )
        ),
    ] = None,
    ids: Annotated[
        str | None, typer.Option(help="Ids to remove, separated by commas, e.g. 3,17,42.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Remove images by --ids or --where: searches skip them at once; `compact` frees the space."""
    from crossrank.shards import is_sharded, remove_sharded
    from crossrank.write import remove_images

    remove_from = remove_sharded if is_sharded(index) else remove_images
    if (where is None) == (ids is None):
        raise typer.BadParameter(
            "give either --where SQL or --ids 1,2,..., not both and not neither"
        )
    with stop_on_ctrl_c(index):
        report = remove_from(index, ids=parse_ids(ids) if ids is not None else None, where=where)
    if as_json:
        _print_json(report.to_dict())
        return
    already = (
        f" ({len(report.already_removed)} were removed before)" if report.already_removed else ""
    )
    path = escape(str(report.index_dir))
    if not report.committed:
        console.print(
            f"[green]nothing to remove[/]{already} -> {path} "
            f"(generation {report.generation}, {report.images} images)",
            highlight=False,
        )
        return
    console.print(
        f"[green]removed {len(report.removed)}[/] images{already} -> {path} "
        f"(generation {report.generation}, {report.images} images; {report.tombstones} "
        f"removed images take space until `crossrank compact {path}`)",
        highlight=False,
    )


@app.command()
@_friendly_errors
def compact(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Rewrite the index without removed images, and delete old generations no reader holds."""
    from crossrank.shards import compact_sharded, is_sharded
    from crossrank.write import compact_index

    compact_it = compact_sharded if is_sharded(index) else compact_index
    columns = _phase_columns()
    with (
        stop_on_ctrl_c(index),
        progress_bar(*columns, disable=as_json, phase="", rate="") as update,
    ):
        report = compact_it(index, progress=_phase_progress(update))
    if as_json:
        _print_json(report.to_dict())
        return
    deleted = (
        f", deleted old generation(s) {', '.join(map(str, report.deleted_generations))}"
        if report.deleted_generations
        else ""
    )
    kept = (
        f"; kept generation(s) {', '.join(map(str, report.kept_generations))}: readers hold them"
        if report.kept_generations
        else ""
    )
    path = escape(str(report.index_dir))
    if not report.committed:
        console.print(
            f"[green]nothing to compact[/]{deleted}{kept} -> {path} "
            f"(generation {report.generation}, {report.images} images)",
            highlight=False,
        )
        return
    console.print(
        f"[green]compacted[/]: dropped {report.dropped} removed images{deleted}{kept}, "
        f"in {report.seconds:.1f} s -> {path} (generation {report.generation}, "
        f"{report.images} images, {escape(report.factory)})",
        highlight=False,
    )

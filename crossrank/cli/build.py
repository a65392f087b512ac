"""``crossrank build``, ``info`` and ``verify``: make an index and look at it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.render import (
    console,
    err_console,
    print_table,
    progress_bar,
)
from crossrank.device import Device
from crossrank.errors import CrossrankError


@app.command()
@_friendly_errors
def build(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of images (recursive) or a .parquet/.csv manifest with a `path` column."
        ),
    ],
    index: Annotated[Path, typer.Option("--index", "-i", help="The index directory to write.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model id or local directory; default: the shipped demo model."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder forward pass.")] = 64,
    device: Annotated[Device, typer.Option(help="Where to encode.")] = Device.AUTO,
    factory: Annotated[
        str | None,
        typer.Option(
            help=(
                "FAISS factory string, e.g. 'IVF1024,Flat' or 'HNSW32'; default: Flat or IVF "
                "by size."
            )
        ),
    ] = None,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed per query (the index's default).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Image decoding threads.")] = 4,
    overwrite: Annotated[
        bool, typer.Option(help="Rebuild an index that already exists in --index.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index a folder or manifest of images."""
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from crossrank.write.build import build_index

    columns = [
        TextColumn("[bold]indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    started: list[float] = []  # when the first batch arrived: images/s counts from there
    with progress_bar(*columns, disable=as_json, rate="") as update:

        def progress(done: int, total: int) -> None:
            if not started:
                started.append(time.perf_counter())
            elapsed = time.perf_counter() - started[0]
            update(
                completed=done,
                total=total,
                rate=f"{done / elapsed:,.0f} img/s" if elapsed > 0.5 else "",
            )

        report = build_index(
            source,
            index,
            model=model,
            batch_size=batch_size,
            device=device.value,
            factory=factory,
            nprobe=nprobe,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
        )
    if as_json:
        _print_json(report.to_dict())
        return
    rate = report.indexed / report.seconds if report.seconds else 0.0
    console.print(
        f"[green]indexed {report.indexed}[/] images, skipped {report.skipped}, "
        f"in {report.seconds:.1f} "
        "s "
        f"({rate:,.0f} img/s overall, model loading included) -> {report.index_dir} (generation "
        f"{report.generation}, {report.factory})"
    )
    if report.skipped:
        console.print(
            f"[yellow]{report.skipped} files skipped:[/] list them with "
            f"`crossrank info {report.index_dir} "
            "--skipped`"
        )


# -- search -----------------------------------------------------------------------------------


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
    from crossrank.api.index import Index

    idx = Index.open(index, device="cpu")
    if skipped:
        rows = idx.skipped().to_pylist()
        if as_json:
            _print_json(rows)
            return
        table = Table("path", "reason", title=f"{len(rows)} skipped files", title_justify="left")
        for row in rows:
            table.add_row(row["path"], row["reason"])
        print_table(table)
        return
    facts = idx.info()
    if as_json:
        _print_json(facts)
        return
    table = Table(show_header=False, box=None)
    enc, fs = facts["encoder"], facts["first_stage"]
    for key, value in (
        ("index", facts["path"]),
        ("generation", facts["generation"]),
        ("images", facts["counts"].get("images")),
        ("skipped", facts["counts"].get("skipped")),
        ("removed", f"{facts.get('tombstones', 0)} (space reclaimed by `crossrank compact`)"),
        ("model", enc.get("model_id")),
        (
            "dims",
            f"pooled {enc.get('dim')}, patches {facts['patches']['n_patches']} x "
            f"{facts['patches']['dim']} "
            "fp16",
        ),
        (
            "first stage",
            f"{fs.get('factory')} (ntotal {fs.get('ntotal')}, nprobe {fs.get('nprobe')})",
        ),
        ("metadata", ", ".join(facts["metadata_columns"])),
        ("updated", facts["updated_at"]),
    ):
        table.add_row(f"[bold]{key}", str(value))
    print_table(table)


@app.command()
@_friendly_errors
def verify(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check that the first stage, patch store and metadata agree; exit 1 on a disagreement."""
    from crossrank.api.index import verify_index
    from crossrank.store import read_manifest

    # Not Index.open: a damaged index (the case verify is for) must be diagnosed, not refused.
    problems = verify_index(index)
    try:
        manifest = read_manifest(index)
        images, generation = manifest.counts.get("images"), manifest.generation
    except CrossrankError:  # a damaged manifest: already the first problem
        images = generation = None
    if as_json:
        _print_json(
            {"ok": not problems, "images": images, "generation": generation, "problems": problems}
        )
    elif problems:
        err_console.print(f"[bold red]error:[/] {problems[0]}", highlight=False, soft_wrap=True)
        if len(problems) > 1:
            err_console.print(f"({len(problems) - 1} more problems; see --json)")
    else:
        console.print(
            f"[green]ok[/]: {images} images, generation {generation}, "
            "first stage, patch store and metadata agree"
        )
    if problems:
        raise typer.Exit(1)


# -- demo -------------------------------------------------------------------------------------

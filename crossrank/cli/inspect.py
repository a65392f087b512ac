"""``crossrank info`` and ``verify``: look at an index and check it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.render import console, err_console, print_table
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
    from crossrank.api.verify import verify_index
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

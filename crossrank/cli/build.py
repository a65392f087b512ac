"""``crossrank build``: index a folder or manifest of images."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.living import stop_on_ctrl_c
from crossrank.cli.render import (
    Notes,
    console,
    progress_bar,
)
from crossrank.device import Device


class Engine(StrEnum):
    """Where ``crossrank build`` decodes and encodes."""

    LOCAL = "local"
    RAY = "ray"


def _built_encoder(index_dir: Path) -> dict:
    """The encoder info an index (sharded or not) records."""
    from crossrank.shards.layout import is_sharded, read_shards_manifest
    from crossrank.store import read_manifest

    if is_sharded(index_dir):
        return read_shards_manifest(index_dir).encoder
    return read_manifest(index_dir).encoder


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
    patch_codec: Annotated[
        str | None,
        typer.Option(
            "--patch-codec",
            help=(
                "How patch features are stored: fp16 (default), int8 (2x smaller), binary, pq "
                "(16x smaller: d/8 sub-quantisers of 8 bits), pq:M or pq:MxB; opq, opq:M, "
                "opq:MxB: the same bytes after a learned rotation, less lost (longer to build). "
                "add and compact keep it."
            ),
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help=(
                "Write a sharded index of N shards (the image with id i goes to shard i % N), "
                "searched as one; see docs/sharding.md."
            )
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(help="Where to decode and encode: this process, or a Ray cluster."),
    ] = Engine.LOCAL,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --engine ray: HOST:PORT of a running Ray cluster (default: a local one).",
        ),
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help=(
                "An interrupted build of --index resumes by default when SOURCE, model, codec and "
                "batch size match (else it starts over); --resume refuses to start over, "
                "--no-resume always does."
            ),
        ),
    ] = None,
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

    from crossrank.errors import InvalidArgumentError
    from crossrank.store.codecs import parse_codec
    from crossrank.write.build import build_index

    try:
        parse_codec(patch_codec)  # a bad name is a usage error, before the model loads
    except InvalidArgumentError as e:
        message = str(e).removeprefix("--patch-codec: ").removeprefix("--patch-codec ")
        raise typer.BadParameter(message, param_hint="--patch-codec") from None
    if shards is not None:
        from crossrank.shards.build import check_shards

        try:
            check_shards(shards)
        except InvalidArgumentError as e:
            message = str(e).removeprefix("--shards ")
            raise typer.BadParameter(message, param_hint="--shards") from None
    from crossrank.shards.layout import is_sharded, read_shards_manifest

    if shards is None and is_sharded(index):
        n = read_shards_manifest(index).n_shards
        raise typer.BadParameter(
            f"{index} is a sharded index of {n} shards; pass --shards {n} to rebuild it, or "
            "build an unsharded index into a new folder",
            param_hint="--shards",
        )
    if resume and shards is not None:
        raise typer.BadParameter(
            "a sharded build does not resume an interrupted one; leave --resume out",
            param_hint="--resume",
        )
    if ray_address is not None and engine != Engine.RAY:
        raise typer.BadParameter(
            "--ray-address needs --engine ray; add it, or leave --ray-address out",
            param_hint="--ray-address",
        )
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
    finishing = "encoded; writing the index"
    if (patch_codec or "").strip().lower().startswith(("pq", "opq")):
        finishing += f" (training the {patch_codec} codec can take minutes)"
    with stop_on_ctrl_c(index), progress_bar(*columns, disable=as_json, rate="") as update:

        def progress(done: int, total: int) -> None:
            if not started:  # a resumed build starts at the files it kept
                started.extend((time.perf_counter(), done))
            elapsed = time.perf_counter() - started[0]
            rate = f"{(done - started[1]) / elapsed:,.0f} img/s" if elapsed > 0.5 else ""
            if total and done >= total:  # the commit: codec training, first stage, files
                rate = finishing
            update(completed=done, total=total, rate=rate)

        # What every engine takes; each adds its own.
        common = {
            "model": model,
            "batch_size": batch_size,
            "device": device.value,
            "factory": factory,
            "nprobe": nprobe,
            "overwrite": overwrite,
            "progress": progress,
            "patch_codec": patch_codec,
        }
        if engine == Engine.RAY:
            from crossrank.distributed import build_on_ray  # only with --engine ray

            report = build_on_ray(
                source,
                index,
                **common,
                ray_address=ray_address,
                shards=shards,
                resume=None if shards is not None else resume,
            )
        elif shards is not None:
            from crossrank.shards import build_sharded

            report = build_sharded(source, index, **common, shards=shards, workers=workers)
        else:
            report = build_index(source, index, **common, workers=workers, resume=resume)
    from crossrank.encoders.describe import describe_model

    encoder = describe_model(_built_encoder(report.index_dir)).to_dict()
    if as_json:
        _print_json({**report.to_dict(), "encoder": encoder})
        return
    rate = report.indexed / report.seconds if report.seconds else 0.0
    path = escape(str(report.index_dir))
    duplicates = f" ({report.duplicates} duplicates)" if report.duplicates else ""
    console.print(
        f"[green]indexed {report.indexed}[/] images, skipped {report.skipped}{duplicates}, "
        f"in {report.seconds:.1f} s ({rate:,.0f} img/s overall, model loading included) -> "
        f"{path} (generation {report.generation}, {escape(report.factory)}"
        f"{f', {shards} shards' if shards else ''}"
        f"{'' if report.patch_codec == 'fp16' else ', patches ' + report.patch_codec})",
        highlight=False,
    )
    if getattr(report, "resumed", 0):
        console.print(
            f"resumed an interrupted build: kept {report.resumed} images encoded before",
            highlight=False,
        )
    if report.skipped:
        console.print(
            f"[yellow]{report.skipped} files skipped:[/] list them with "
            f"`crossrank info {path} --skipped`",
            highlight=False,
        )
    demo = " (demo encoder)" if encoder["demo"] else ""
    console.print(f"[dim]encoder {escape(encoder['model_id'])}{demo}[/]", highlight=False)
    Notes().show(encoder, ())


# -- search -----------------------------------------------------------------------------------

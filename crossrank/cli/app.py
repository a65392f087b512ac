"""The ``crossrank`` command line: parse, call the library, render.

Every command is a thin shell over the public API (:class:`crossrank.Index` and friends). A
:class:`~crossrank.errors.CrossrankError` becomes one red line on stderr and exit code 1;
``--verbose`` shows the traceback instead. Heavy modules load inside the commands, so
``crossrank --help`` is quick.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from crossrank.cli.render import (
    console,
    err_console,
    mark_relevance,
    print_table,
    progress_bar,
    render_eval,
)
from crossrank.device import Device
from crossrank.errors import CrossrankError

__all__ = ["app", "main"]

app = typer.Typer(
    name="crossrank",
    help=(
        "Multimodal image retrieval: a FAISS first stage, reranked by query tokens attending "
        "to image "
        "patches."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"verbose": False}
F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("crossrank").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _friendly_errors(fn: F) -> F:
    """Turn a CrossrankError into one red line and exit code 1 (a traceback with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CrossrankError as e:
            if _state["verbose"]:
                raise
            # escape: a message may hold brackets, e.g. pip install 'crossrank[serve]'
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -- build ------------------------------------------------------------------------------------


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
def search(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    query: Annotated[
        str | None, typer.Argument(help="The text to search for (or use --image).")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Hits to return.")] = 10,
    rerank_k: Annotated[int, typer.Option(help="First-stage candidates to rerank (>= k).")] = 100,
    reranker: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the index's own reranker/; blip-itm on a BLIP index; the shipped "
                "demo reranker "
                "on a demo-encoder index; else maxsim), maxsim, blip-itm, none, or a trained "
                "reranker "
                "folder."
            )
        ),
    ] = "auto",
    fusion: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the reranker's recommendation, else rerank), rerank, sum, or weighted:ALPHA "
                "(ALPHA*rerank + (1-ALPHA)*first stage)."
            )
        ),
    ] = "auto",
    where: Annotated[
        str | None,
        typer.Option(help='DuckDB SQL filter over metadata columns, e.g. "width > 256".'),
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="Search by this image instead of a text.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model to encode the query with; must be the index's.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF lists probed (default: the index's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html", help="Also write the hits as a self-contained HTML page of thumbnails."
        ),
    ] = None,
) -> None:
    """Search an index by text, or by image with --image."""
    from crossrank.api.index import Index

    if (query is None) == (image is None):
        raise typer.BadParameter(
            "give either a QUERY text or --image PATH, not both and not neither"
        )
    idx = Index.open(index, device=device.value, model=model, nprobe=nprobe)
    result = idx.search(
        query if image is None else image,
        k=k,
        rerank_k=rerank_k,
        where=where,
        reranker=None if reranker == "none" else reranker,
        fusion=fusion,
    )
    if html is not None:
        from crossrank.html import write_page

        try:
            write_page(result, html)
        except OSError as e:
            raise CrossrankError(f"--html {html} cannot be written: {e.strerror or e}") from e
        err_console.print(f"[dim]wrote {escape(str(html))}[/]", highlight=False)
    if as_json:
        _print_json(result.to_dict())
        return
    table = Table(title=f"{result.query!r}", title_justify="left")
    for col, justify in (
        ("#", "right"),
        ("score", "right"),
        ("first stage", "right"),
        ("rerank", "right"),
        ("id", "right"),
        ("path", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for rank, hit in enumerate(result, start=1):
        table.add_row(
            str(rank),
            f"{hit.score:.4f}",
            f"{hit.first_stage_score:.4f}",
            "-" if hit.rerank_score is None else f"{hit.rerank_score:.4f}",
            str(hit.id),
            hit.path,
        )
    print_table(table)
    c = result.counts
    line = (
        f"{c.returned} of {c.requested} requested · {c.filtered_out} filtered out · "
        f"{c.candidates} candidates · {result.timings_ms['total']:.1f} ms"
    )
    console.print(line if c.returned == c.requested else f"[yellow]{line}[/]")


# -- info / verify ----------------------------------------------------------------------------


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


@app.command()
@_friendly_errors
def demo(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder to write the benchmark, index and runs into."),
    ] = Path("crossrank-demo"),
    n_images: Annotated[int, typer.Option(help="Corpus size.")] = 2000,
    n_queries: Annotated[int, typer.Option(help="Evaluation queries.")] = 300,
    seed: Annotated[int, typer.Option(help="Benchmark seed.")] = 0,
    model: Annotated[
        str | None, typer.Option(help="Encoder; default: the shipped demo model.")
    ] = None,
    reranker: Annotated[
        str,
        typer.Option(
            help=(
                "Reranker to compare with the first stage: auto (the shipped demo reranker for the "
                "demo encoder), maxsim, none, or a folder."
            )
        ),
    ] = "auto",
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate a compositional benchmark, index it, show example queries and evaluate (offline).

    Takes about a minute.
    """
    from crossrank.demo import run_demo

    def say(message: str) -> None:
        if not as_json:
            err_console.print(f"[dim]·[/] {message}")

    report = run_demo(
        out,
        n_images=n_images,
        n_queries=n_queries,
        seed=seed,
        model=model,
        reranker=reranker,
        device=device.value,
        progress=say,
    )
    if as_json:
        _print_json(report.to_dict())
        return
    for ex in report.examples:
        table = Table(
            title=(
                f"{ex['query']!r}  "
                f"[dim]({ex['kind']}, {ex['relevant_in_corpus']} relevant images)[/]"
            ),
            title_justify="left",
        )
        table.add_column("#", justify="right")
        table.add_column("first stage", justify="left")
        table.add_column(f"+ {report.evaluation.get('reranker') or reranker}", justify="left")
        for rank, (a, b) in enumerate(
            zip(ex["first_stage"], ex["reranked"], strict=False), start=1
        ):
            table.add_row(str(rank), mark_relevance(a), mark_relevance(b))
        print_table(table)
    render_eval(report.evaluation)
    s = report.seconds
    console.print(
        f"[green]done[/] in {s['total']:.0f} s (dataset {s['dataset']:.0f} s, "
        f"build {s['build']:.0f} "
        "s, "
        f"eval {s['eval']:.0f} s) -> {report.out_dir}/"
    )
    console.print(
        f'try: crossrank search {report.out_dir}/index "a red circle left of a blue square"'
    )


# -- eval -------------------------------------------------------------------------------------


@app.command("eval")
@_friendly_errors
def eval_cmd(
    index: Annotated[Path, typer.Argument(help="The index directory.")],
    queries: Annotated[
        Path,
        typer.Option(
            help="Queries: .parquet (query_id, text[, kind, heldout]) or .tsv (qid<TAB>text)."
        ),
    ],
    qrels: Annotated[
        Path,
        typer.Option(
            help="TREC qrels (qid 0 docid rel); docids are image paths relative to its folder."
        ),
    ],
    rerank_k: Annotated[int, typer.Option(min=1, help="First-stage candidates per query.")] = 100,
    reranker: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the index's own reranker/; blip-itm on a BLIP index; the shipped "
                "demo reranker "
                "on a demo-encoder index; else maxsim), maxsim, blip-itm, none, or a trained "
                "reranker "
                "folder."
            )
        ),
    ] = "auto",
    fusion: Annotated[
        str,
        typer.Option(
            help=(
                "auto (the reranker's recommendation, else rerank), rerank, sum, or weighted:ALPHA."
            )
        ),
    ] = "auto",
    run_out: Annotated[
        Path | None, typer.Option(help="Write first_stage.run and reranked.run (TREC) here.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate the first stage alone and with the reranker.

    Reports R@1/5/10, MRR@10, nDCG@10, P@10 and latency.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from crossrank.api.index import Index
    from crossrank.evaluate import evaluate_index

    idx = Index.open(index, device=device.value)
    with progress_bar(
        TextColumn("[bold]evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=as_json,
        transient=True,
    ) as update:
        report = evaluate_index(
            idx,
            queries,
            qrels,
            rerank_k=rerank_k,
            reranker=reranker,
            fusion=fusion,
            run_out=run_out,
            progress=lambda d, t: update(completed=d, total=t),
        )
    if as_json:
        _print_json(report.to_dict())
        return
    render_eval(report.to_dict())


# -- datasets and the demo encoder ------------------------------------------------------------

dataset_app = typer.Typer(help="Generate benchmark datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("shapes")
@_friendly_errors
def dataset_shapes(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the dataset into.")],
    n_images: Annotated[int, typer.Option(help="Images in the corpus.")] = 2000,
    n_queries: Annotated[int, typer.Option(help="Queries (each with >= 1 relevant image).")] = 300,
    seed: Annotated[
        int, typer.Option(help="Random seed; the same seed gives identical files.")
    ] = 0,
    split: Annotated[
        str,
        typer.Option(
            help="test (the corpus to evaluate on) or train (disjoint, no held-out pairs)."
        ),
    ] = "test",
    image_size: Annotated[int, typer.Option(help="Image side in pixels (64-96).")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Synthetic compositional scenes (coloured shapes in spatial relations) with exact qrels."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from crossrank.datasets import generate_shapes

    with progress_bar(
        TextColumn("[bold]rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=as_json,
    ) as update:
        ds = generate_shapes(
            out,
            n_images=n_images,
            n_queries=n_queries,
            seed=seed,
            split=split,
            image_size=image_size,
            overwrite=overwrite,
            progress=lambda done, total: update(completed=done, total=total),
        )
    summary = {
        "out": str(ds.root),
        "split": str(ds.config.split),
        "seed": seed,
        "images": ds.n_images,
        "queries": ds.n_queries,
        "heldout_queries": ds.n_heldout_queries,
        "pairs": ds.n_pairs,
    }
    if as_json:
        _print_json(summary)
    else:
        console.print(
            f"[green]wrote[/] {ds.n_images} images, {ds.n_queries} queries "
            f"({ds.n_heldout_queries} held-out), {ds.n_pairs} training pairs -> {ds.root}"
        )


@app.command("train-encoder")
@_friendly_errors
def train_encoder_cmd(
    data: Annotated[
        Path,
        typer.Option(help="A shapes dataset made with `crossrank dataset shapes --split train`."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where the model goes (Hugging Face format); a checkpoint there is resumed.",
        ),
    ],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    caption_negatives: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "NegCLIP: per caption, this many rewrites false of its image (swapped bindings or "
                "objects, another relation) as extra text negatives, so the encoder cannot treat a "
                "caption as a bag of words. 0 = off."
            ),
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            help=(
                "Fine-tune this CLIP (a directory made by train-encoder, or crossrank-demo for the "
                "shipped one) instead of training from scratch."
            )
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train the demo dual encoder (a small CLIP) on generated pairs.

    From scratch, or fine-tuned from --init-from. Settings left out keep EncoderTrainConfig's
    defaults.
    """
    import shlex
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from crossrank.training.encoder import (
        DEMO_SPEC,
        EncoderTrainConfig,
        shapes_train_data,
        train_encoder,
    )

    try:
        given = _given(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            caption_negatives=caption_negatives,
            init_from=init_from,
        )
        config = EncoderTrainConfig(**given, device=device.value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if init_from is not None:  # fail before the minute of loading images, not after
        from crossrank.encoders.loading import resolve_model

        resolve_model(init_from)
    t0 = time.perf_counter()
    train_data = shapes_train_data(
        data, DEMO_SPEC.image_size, caption_negatives=config.caption_negatives > 0
    )
    with progress_bar(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=as_json,
        loss="-",
    ) as update:
        path = train_encoder(
            train_data,
            out,
            config,
            progress=lambda step, total, loss: update(
                completed=step, total=total, loss=f"{loss:.3f}"
            ),
            extra={"command": "crossrank " + shlex.join(sys.argv[1:])},
        )
    summary = {
        "out": str(path),
        "steps": config.steps,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if as_json:
        _print_json(summary)
    else:
        console.print(f"[green]trained[/] {config.steps} steps in {summary['seconds']} s -> {path}")


@app.command("train")
@_friendly_errors
def train_cmd(
    pairs: Annotated[
        Path,
        typer.Argument(
            help=(
                "Training pairs: .parquet/.csv with `path` and `caption` (paths relative to "
                "its folder)."
            )
        ),
    ],
    index: Annotated[
        Path,
        typer.Option(
            "--index",
            "-i",
            help="An index built over the pairs' images (its encoder stays frozen).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Where the reranker goes (safetensors + config.json); a checkpoint there "
                "is resumed. "
                "Use DIR/reranker to make it the index's default."
            ),
        ),
    ],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=(
                "A reranker config.json, as a checkpoint saves it (or its folder): its "
                "architecture, and its recorded training settings when it has them, replace "
                "the library defaults; the flags below override both."
            ),
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Queries per step.")] = None,
    candidates: Annotated[
        int | None, typer.Option(min=2, help="Candidates per query: 1 positive + negatives.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="listwise (softmax over each candidate list) or itm (binary matching)."),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    hard_fraction: Annotated[
        float | None,
        typer.Option(help="Share of negatives mined from the first stage's top candidates."),
    ] = None,
    curriculum: Annotated[
        float | None,
        typer.Option(help="Share of the steps over which the hard share ramps up from 0."),
    ] = None,
    mine_k: Annotated[
        int | None, typer.Option(min=2, help="First-stage depth mined for hard negatives.")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between validations and checkpoints.")
    ] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="Cross-attention layers.")] = None,
    width: Annotated[int | None, typer.Option(min=8, help="Reranker width.")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="Attention heads.")] = None,
    gated: Annotated[
        bool | None,
        typer.Option(
            help=(
                "Tanh gates on the residual branches, initialised at 0 (an untrained model is the "
                "identity; slower to learn from scratch)."
            )
        ),
    ] = None,
    prenorm: Annotated[
        bool | None, typer.Option(help="A LayerNorm per modality before projecting.")
    ] = None,
    patch_self_attention: Annotated[
        bool | None,
        typer.Option(help="Patches of a candidate attend to each other in every layer."),
    ] = None,
    bidirectional: Annotated[
        bool | None, typer.Option(help="Patches attend back to the query tokens in every layer.")
    ] = None,
    query_self_attention: Annotated[
        bool | None,
        typer.Option(
            help="Query positions attend to each other in every layer (compares what they read)."
        ),
    ] = None,
    patch_positions: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Learned position embedding over this many patch slots (default: the index's "
                "patches "
                "per image; 0 = none)."
            ),
            show_default=False,
        ),
    ] = None,
    pair_head: Annotated[
        bool | None,
        typer.Option(
            help=(
                "A pairwise spatial head: each pair of query positions scored from their "
                "states and "
                "the difference of where they looked (for relations such as 'left of'). "
                "Needs a square "
                "patch grid."
            )
        ),
    ] = None,
    token_embeddings: Annotated[
        bool | None,
        typer.Option(
            help=(
                "Also read the text encoder's layer-0 token states (token plus position "
                "embeddings) "
                "beside its last layer's token features: words the last layer merges (the "
                "demo encoder's "
                "'left' and 'right') stay apart. Search and eval then encode queries with them."
            )
        ),
    ] = None,
    query_tokens: Annotated[
        int | None,
        typer.Option(min=0, help="Learnable Q-Former-style query tokens beside the text tokens."),
    ] = None,
    sparse_top_m: Annotated[
        int | None, typer.Option(min=1, help="Each query token attends to its top-m patches only.")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help=(
                "Weight init from scratch: lecun (std 1/sqrt(fan_in), learns binding faster) "
                "or bert "
                "(std 0.02)."
            )
        ),
    ] = None,
    first_stage_weight: Annotated[
        str | None,
        typer.Option(
            help=(
                "Residual training: logits add W x the first-stage cosine, so the reranker learns "
                "a correction; search then fuses with weighted:1/(1+W) by default. auto "
                "= the encoder's "
                "logit scale (CLIP's exp(logit_scale), 35.9 for the demo encoder; 0 for an encoder "
                "without one); 0 = off."
            )
        ),
    ] = None,
    caption_negatives: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Per pair, this many rewrites of its caption that are false of its image (swapped "
                "colours, shapes or objects, another relation, one object changed), ranked against "
                "the true caption: a text-side loss that teaches binding. Needs a pairs file in a "
                "shapes dataset (its scene graphs decide what is false). 0 = off."
            ),
        ),
    ] = None,
    caption_only_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Curriculum: the first N steps train on the caption negatives alone (the reranker "
                "by itself, no residual, no image lists; cheaper steps), then both losses. "
                "Needs --caption-negatives."
            ),
        ),
    ] = None,
    attention_supervision: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help=(
                "Weight of a loss that pulls the last layer's attention of each object word of the "
                "true caption onto that object's patches (from the scene graphs: needs "
                "--caption-negatives on a shapes dataset). 0 = off."
            ),
        ),
    ] = None,
    relation_share: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help=(
                "Share of each step's caption-negative lists given to relation captions "
                "ranked only "
                "against their rewrites that keep both objects (another relation, or the "
                "objects swapped around it): the lists where the relation is the whole signal. "
                "Needs --caption-negatives. 0 = off."
            ),
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fine-tune a cross-attention reranker over an index's frozen encoder features.

    Settings left out keep the library's defaults (RerankerConfig, RerankTrainConfig).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from crossrank.api.index import Index
    from crossrank.errors import InvalidArgumentError
    from crossrank.training import RerankTrainConfig, train_reranker
    from crossrank.training.reranker import resolve_model_config

    model_fields, train_fields = _read_train_config(config_file)
    model_fields.update(
        _given(
            layers=layers,
            width=width,
            heads=heads,
            gated=gated,
            prenorm=prenorm,
            patch_self_attention=patch_self_attention,
            bidirectional=bidirectional,
            query_self_attention=query_self_attention,
            patch_positions=patch_positions,
            pair_head=pair_head,
            n_query_tokens=query_tokens,
            sparse_top_m=sparse_top_m,
            init=init,
            token_embeddings=None if token_embeddings is None else int(token_embeddings),
        )
    )
    train_fields.update(
        _given(
            steps=steps,
            batch_size=batch_size,
            n_candidates=candidates,
            loss=loss,
            lr=lr,
            hard_fraction=hard_fraction,
            curriculum=curriculum,
            mine_k=mine_k,
            eval_every=eval_every,
            checkpoint_every=eval_every,  # --eval-every sets both
            seed=seed,
            first_stage_weight=_first_stage_weight(first_stage_weight),
            caption_negatives=caption_negatives,
            caption_only_steps=caption_only_steps,
            attention_supervision=attention_supervision,
            relation_share=relation_share,
        ),
        device=device.value,
    )
    if steps is not None and "warmup" in train_fields and config_file is not None:
        train_fields.pop("warmup")  # the file's warm-up was sized for its own step count
    try:
        config = RerankTrainConfig(**train_fields)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    idx = Index.open(index, device=device.value)
    try:  # after opening: the default patch positions are the index encoder's patch count
        model_config = resolve_model_config(model_fields, idx.manifest.encoder, idx)
    except InvalidArgumentError as e:
        raise typer.BadParameter(str(e)) from None
    with progress_bar(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=as_json,
        loss="-",
        acc="-",
    ) as update:
        report = train_reranker(
            idx,
            pairs,
            out,
            model_config=model_config,
            config=config,
            progress=lambda step, total, lss, acc: update(
                completed=step, total=total, loss=f"{lss:.3f}", acc=f"{acc:.2f}"
            ),
        )
    if as_json:
        _print_json(report.to_dict())
        return
    console.print(
        f"[green]trained[/] {report.steps} steps ({report.steps_per_second:.1f} steps/s on "
        f"{report.device}) "
        f"-> {report.out_dir}"
    )
    if report.first_stage_weight > 0:
        console.print(
            f"residual over the first stage with W = {report.first_stage_weight:g}: search fuses "
            "with "
            f"weighted:{1 / (1 + report.first_stage_weight):.6g} (--fusion auto)"
        )
    else:
        console.print(
            "no first-stage residual (W = 0): search ranks by the reranker's score alone (--fusion "
            "auto)"
        )
    if report.final:
        console.print(
            f"validation R@1 reranking the top {config.mine_k}: "
            f"{report.final.get('val_r1', float('nan')):.3f} "
            f"(first stage {report.first_stage.get('r1', float('nan')):.3f}); "
            f"accuracy among {config.n_candidates} candidates "
            f"{report.final.get('val_accuracy', float('nan')):.3f}"
        )
        if "val_caption_accuracy" in report.final:
            console.print(
                "validation caption accuracy (the true caption first among "
                f"{config.caption_negatives} rewrites): "
                f"{report.final['val_caption_accuracy']:.3f}"
            )
    skipped = report.counts.get("missing_image", 0) + report.counts.get("empty_caption", 0)
    if skipped:
        console.print(
            f"[yellow]skipped {skipped} pairs[/] ({report.counts.get('missing_image', 0)} images "
            "not in the "
            f"index, {report.counts.get('empty_caption', 0)} empty captions)"
        )


def _given(**values: Any) -> dict[str, Any]:
    """The settings given on the command line (None = left out: the library default applies)."""
    return {name: value for name, value in values.items() if value is not None}


def _first_stage_weight(text: str | None) -> float | str | None:
    """``--first-stage-weight``: auto, a number, or None when left out."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(
            f"--first-stage-weight must be auto or a number >= 0, got {text!r}"
        ) from None


def _read_train_config(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture fields and the recorded training settings of a reranker ``config.json``
    (or of the folder holding one); two empty dicts without ``--config``."""
    import dataclasses
    import json

    if path is None:
        return {}, {}
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise typer.BadParameter(
            f"--config {file} does not exist; give a reranker's config.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"--config {file} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise typer.BadParameter(
            f'--config {file} holds no reranker config: expected a JSON object with a "config" '
            "object of RerankerConfig fields, as a checkpoint's config.json has"
        )
    metadata = data.get("metadata")
    train = metadata.get("train") if isinstance(metadata, dict) else None
    train = dict(train) if isinstance(train, dict) else {}
    from crossrank.training import RerankTrainConfig

    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(RerankTrainConfig)})
    if unknown:
        raise typer.BadParameter(
            f"--config {file} records unknown training settings {unknown} in metadata.train "
            "(was it written by a newer crossrank?)"
        )
    return dict(data["config"]), train


def main() -> None:
    """Console-script entry point."""
    from crossrank.allocator import keep_large_allocations

    keep_large_allocations()  # large rerank buffers are reused, not re-faulted per query
    app()

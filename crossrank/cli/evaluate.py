"""``crossrank demo``, ``eval`` and ``dataset``: the offline benchmark and its measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from crossrank.cli.app import (
    FusionOption,
    PrecisionOption,
    RerankerOption,
    _friendly_errors,
    _print_json,
    app,
)
from crossrank.cli.build import Engine
from crossrank.cli.render import (
    console,
    err_console,
    mark_relevance,
    print_table,
    progress_bar,
    render_eval,
    stage_bars,
)
from crossrank.cli.search import EngineOption, RayAddressOption, check_engine, open_for_search
from crossrank.device import Device, Precision


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
                "demo encoder; none for a model without a trained reranker), maxsim, none, or a "
                "folder."
            )
        ),
    ] = "auto",
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate a compositional benchmark, index it, show example queries and evaluate (offline).

    Takes about a minute; a progress bar per stage (dataset, build, eval) on stderr.
    """
    from crossrank.demo import run_demo

    with stage_bars(disable=as_json) as step:

        def say(message: str) -> None:
            if not as_json:
                err_console.print(f"[dim]·[/] {escape(message)}", highlight=False)

        report = run_demo(
            out,
            n_images=n_images,
            n_queries=n_queries,
            seed=seed,
            model=model,
            reranker=reranker,
            device=device.value,
            progress=say,
            stage_progress=step,
        )
    if as_json:
        _print_json(report.to_dict())
        return
    for ex in report.examples:
        table = Table(
            title=(
                f"{escape(repr(ex['query']))}  "
                f"[dim]({escape(str(ex['kind']))}, {ex['relevant_in_corpus']} relevant images)[/]"
            ),
            title_justify="left",
        )
        # The reranker is named under the eval table (its label may be a long folder path).
        table.add_column("#", justify="right")
        table.add_column("first stage", justify="left", no_wrap=True)
        table.add_column("reranked", justify="left", no_wrap=True)
        for rank, (a, b) in enumerate(
            zip(ex["first_stage"], ex["reranked"], strict=False), start=1
        ):
            table.add_row(str(rank), mark_relevance(a), mark_relevance(b))
        print_table(table)
    render_eval(report.evaluation)
    s = report.seconds
    console.print(
        f"[green]done[/] in {s['total']:.0f} s (dataset {s['dataset']:.0f} s, "
        f"build {s['build']:.0f} s, eval {s['eval']:.0f} s) -> {escape(str(report.out_dir))}/",
        highlight=False,
    )
    console.print(
        f"try: crossrank search {escape(str(report.out_dir))}/index "
        '"a red circle left of a blue square"',
        highlight=False,
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
    reranker: RerankerOption = "auto",
    fusion: FusionOption = "auto",
    run_out: Annotated[
        Path | None, typer.Option(help="Write first_stage.run and reranked.run (TREC) here.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to encode and rerank.")] = Device.AUTO,
    precision: PrecisionOption = Precision.AUTO,
    engine: EngineOption = Engine.LOCAL,
    ray_address: RayAddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate the first stage alone and with the reranker.

    Reports R@1/5/10, MRR@10, nDCG@10, P@10 and latency, and names the encoder, reranker and
    fusion. --json carries the metrics unrounded; the table rounds them to 3 decimals.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from crossrank.evaluate import evaluate_index

    check_engine(engine, ray_address)
    idx = open_for_search(
        index, device.value, None, None, engine, ray_address, precision=precision.value
    )
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

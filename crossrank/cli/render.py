"""Rendering for the CLI: progress bars on stderr, eval tables and demo rows (rich).

User text (queries, paths, metadata values, column names, labels holding paths) is always printed
literally: it goes through :func:`rich.markup.escape` or a :class:`rich.text.Text`, never through
rich's markup parser, so ``[bold]m.png`` prints as ``[bold]m.png`` and ``[/x]`` cannot crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = [
    "console",
    "err_console",
    "describe_search",
    "explain_table",
    "mark_relevance",
    "Notes",
    "print_table",
    "progress_bar",
    "render_eval",
    "stage_bars",
]

console = Console()
err_console = Console(stderr=True)


def print_table(table: Table) -> None:
    """Print a table whole: piped into a file or a CI log (no terminal), rich would fit it to 80
    columns and cut numbers to ``0.9…``; there it gets the width it needs. A terminal keeps its
    own width."""
    if console.is_terminal:
        console.print(table)
        return
    needed = console.measure(table, options=console.options.update_width(10_000)).maximum
    # print(width=) cannot exceed the console's own width: a console of the needed width, same file.
    Console(
        file=console.file,
        width=max(console.width, needed),
        no_color=console.no_color,
        highlight=False,
    ).print(table)


@contextmanager
def progress_bar(
    *columns: Any, disable: bool, transient: bool = False, **fields: Any
) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr that appears with its first update.

    Yields ``update(**task_fields)``. An error raised before any work starts (a bad argument, a
    missing folder) therefore stays one line, with no empty bar above it.
    """
    from rich.progress import Progress

    bar = Progress(*columns, console=err_console, disable=disable, transient=transient)
    task = bar.add_task("", total=None, start=False, **fields)
    started = False

    def update(**task_fields: Any) -> None:
        nonlocal started
        if not started:  # elapsed time and ETA count from the first update
            bar.start()
            bar.start_task(task)
            started = True
        bar.update(task, **task_fields)

    try:
        yield update
    finally:
        if started:
            bar.stop()


@contextmanager
def stage_bars(*, disable: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Progress bars on stderr for work in named stages (the demo: dataset, build, eval).

    Yields ``update(stage, done, total)``; a stage's bar appears with its first update, below the
    bars of the stages before it, which stay on screen finished.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=disable,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(escape(stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def mark_relevance(row: dict[str, Any]) -> str:
    """A demo hit as markup: a tick or a cross, the path (escaped: printed literally), the score."""
    tick = "[green]✓[/]" if row["relevant"] else "[red]✗[/]"
    return f"{tick} {escape(str(row['path']))} [dim]{row['score']:.3f}[/]"


def explain_table(result: Any) -> Table | None:
    """Where each word looked, per hit: the patch that took most of its weight, as ``row,col``
    on the patch grid (from the top left), and that weight rounded to two decimals; None when no
    hit carries maps. The full maps are in ``--json`` and ``--html``."""
    from rich.text import Text

    explained = [(rank, hit.explain) for rank, hit in enumerate(result, start=1) if hit.explain]
    if not explained:
        return None
    tokens = explained[0][1].tokens
    rows, cols = explained[0][1].grid
    table = Table(
        title=Text(f"where each word looked (peak patch row,col of {rows}x{cols}, weight)"),
        title_justify="left",
    )
    table.add_column("#", justify="right")
    for token in tokens:
        table.add_column(Text(token), justify="right")
    for rank, ex in explained:
        cells = []
        for row in ex.maps:
            j = int(row.argmax())
            cells.append(f"{j // ex.grid[1]},{j % ex.grid[1]} {float(row[j]):.2f}")
        table.add_row(str(rank), *cells)
    return table


def describe_search(encoder: Mapping[str, Any] | None, reranker: str, fusion: str) -> str:
    """One line of markup naming the encoder, the reranker and the fusion (user text escaped)."""
    parts = []
    if encoder:
        demo = " (demo encoder)" if encoder.get("demo") else ""
        parts.append(f"encoder {escape(str(encoder.get('model_id')))}{demo}")
    parts.append(f"reranker {escape(reranker)}")
    if reranker != "none":
        parts.append(f"fusion {escape(fusion)}")
    return "[dim]" + " · ".join(parts) + "[/]"


class Notes:
    """The notes of a command's results, each printed once to stderr in yellow.

    The demo encoder's note (``encoder["note"]``) and the hint to train a reranker are the same
    for every query of a command: said once, not once per query.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def show(self, encoder: Mapping[str, Any] | None, notes: Iterable[str]) -> None:
        lines = [str(encoder["note"])] if encoder and encoder.get("note") else []
        for line in [*lines, *notes]:
            if line not in self._seen:
                self._seen.add(line)
                err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)


_GROUP_LABELS = {
    "heldout=true": "held-out",
    "heldout=false": "seen",
    "kind=single": "single",
    "kind=pair": "pair",
    "kind=relation": "relation",
}


def render_eval(report: dict[str, Any]) -> None:
    """Print an eval report (the ``--json`` dict) as a table that fits 80 columns, the line
    naming its encoder, reranker and fusion, and its notes (stderr)."""
    metrics = list(report["first_stage"])
    stages = [("first", "first_stage")]
    if report["reranked"]:
        stages.append(("reranked", "reranked"))
    # No vertical rules: nine columns of whole numbers fit 80 columns (none is cut to 0.9…).
    table = Table(
        title=f"{report['queries']} queries",
        title_justify="left",
        padding=(0, 1),
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for col in ("group", "n", "stage", *metrics):
        table.add_column(
            col, justify="left" if col in ("group", "stage") else "right", no_wrap=True
        )
    groups = [("all", {"queries": report["queries"], **{key: report[key] for _, key in stages}})]
    groups += [(_GROUP_LABELS.get(name, name), entry) for name, entry in report["groups"].items()]
    for name, entry in groups:
        for i, (label, key) in enumerate(stages):
            table.add_row(
                escape(name) if i == 0 else "",
                str(entry["queries"]) if i == 0 else "",
                label,
                *(f"{entry[key][m]:.3f}" for m in metrics),
                end_section=i == len(stages) - 1,
            )
    print_table(table)
    console.print(
        describe_search(
            report.get("encoder"), report.get("reranker", "none"), report.get("fusion", "")
        )
    )
    lat = report["latency_ms"]
    console.print(
        "latency per query, ms (p50 / p95): "
        + ", ".join(f"{stage} {v['p50']:.1f} / {v['p95']:.1f}" for stage, v in lat.items())
    )
    if report["excluded_qids"]:
        console.print(
            f"[yellow]{len(report['excluded_qids'])} queries have no relevant image in the qrels "
            f"and were left out:[/] {escape(', '.join(report['excluded_qids'][:10]))}"
        )
    Notes().show(report.get("encoder"), report.get("notes", ()))

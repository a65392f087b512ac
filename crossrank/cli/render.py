"""Rendering for the CLI: progress bars on stderr, eval tables and demo rows (rich)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["console", "err_console", "print_table", "progress_bar", "render_eval", "mark_relevance"]

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


def mark_relevance(row: dict[str, Any]) -> str:
    tick = "[green]✓[/]" if row["relevant"] else "[red]✗[/]"
    return f"{tick} {row['path']} [dim]{row['score']:.3f}[/]"


_GROUP_LABELS = {
    "heldout=true": "held-out",
    "heldout=false": "seen",
    "kind=single": "single",
    "kind=pair": "pair",
    "kind=relation": "relation",
}


def render_eval(report: dict[str, Any]) -> None:
    """Print an eval report (the ``--json`` dict) as rich tables."""
    metrics = list(report["first_stage"])
    stages = [("first", "first_stage")]
    if report["reranked"]:
        stages.append((f"+{report['reranker']}", "reranked"))
    table = Table(title=f"{report['queries']} queries", title_justify="left", padding=(0, 1))
    for col in ("group", "n", "stage", *metrics):
        table.add_column(
            col, justify="left" if col in ("group", "stage") else "right", no_wrap=True
        )
    groups = [("all", {"queries": report["queries"], **{key: report[key] for _, key in stages}})]
    groups += [(_GROUP_LABELS.get(name, name), entry) for name, entry in report["groups"].items()]
    for name, entry in groups:
        for i, (label, key) in enumerate(stages):
            table.add_row(
                name if i == 0 else "",
                str(entry["queries"]) if i == 0 else "",
                label,
                *(f"{entry[key][m]:.3f}" for m in metrics),
                end_section=i == len(stages) - 1,
            )
    print_table(table)
    lat = report["latency_ms"]
    console.print(
        "latency per query, ms (p50 / p95): "
        + ", ".join(f"{stage} {v['p50']:.1f} / {v['p95']:.1f}" for stage, v in lat.items())
    )
    if report["excluded_qids"]:
        console.print(
            f"[yellow]{len(report['excluded_qids'])} queries have no relevant image in the qrels "
            f"and were left out:[/] {', '.join(report['excluded_qids'][:10])}"
        )

"""`tokensieve demo` and `tokensieve show`."""

from __future__ import annotations

import json

import click
import torch

from tokensieve.demo.cases import CASES
from tokensieve.demo.run import DEFAULT_SAMPLES, TIMING_BATCH, TIMING_ROUNDS


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="tokensieve-demo", show_default=True,
              help="The report folder: index.html, the pictures as PNGs, demo.json.")
@click.option("--samples", type=click.IntRange(min=2), default=DEFAULT_SAMPLES, show_default=True,
              help="The first N samples of each test split.")
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(list(CASES)),
              help="Run only these tasks (repeatable; default: all).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--timing-rounds", type=click.IntRange(min=1), default=TIMING_ROUNDS, show_default=True)
@click.option("--timing-batch", type=click.IntRange(min=1), default=TIMING_BATCH, show_default=True,
              help="Samples of each timed forward.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def demo(out: str, samples: int, tasks: tuple[str, ...], threads: int, timing_rounds: int,
         timing_batch: int, as_json: bool) -> None:
    """Every method the package ships trained, on its task's reference model, beside dense and
    training-free baselines: scores, GMACs and measured speedups on a slice of each test split,
    and pictures of the tokens each kept. Offline; a few minutes on 2 CPU cores."""
    from rich.console import Console
    from rich.table import Table

    from tokensieve.demo import run_demo
    from tokensieve.demo.report import COLUMNS, table_cells

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = run_demo(out, samples, tasks or tuple(CASES), timing_batch, timing_rounds,
                          progress=not as_json)
    finally:
        torch.set_num_threads(before)  # a caller in the same process keeps its own
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"tokensieve demo: first {samples} test samples per task, {threads} threads")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("task", "method", "kind") else "right")
    for row in report.rows:
        table.add_row(*table_cells(row))
    Console(width=170).print(table)
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"report: {report.page} ({len(report.pictures)} pictures beside it); {report.seconds:.0f} s")


@click.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", type=click.Choice(list(CASES)), required=True)
@click.option("--method", default=None,
              help="A method the package ships trained for TASK by name (seg: svit; tos: vltp; nlvr: madtp), "
                   "or a spec such as tome:r=11 (default: TASK's first shipped method).")
@click.option("--text", default=None, help="tos, nlvr, retrieval: the sentence, in the tasks' words.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The PNG to write (default: IMAGE's name with _keep.png, beside it).")
def show(image: str, task: str, method: str | None, text: str | None, out: str | None) -> None:
    """Draw which tokens a method keeps of IMAGE (PNG, JPEG) on TASK's reference model."""
    from tokensieve.demo.show import show as draw

    try:
        drawn = draw(image, task, method or CASES[task].shipped[0], text, out)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    for picture in drawn:
        click.echo(f"wrote {picture.path} ({picture.width}x{picture.height})")

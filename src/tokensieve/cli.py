"""The `tokensieve` command line: `flops` and `bench` on a timm model name or a transformers directory;
`train` and `eval` on the reference task models (cli_tasks.py); `demo` and `show` (cli_demo.py)."""

from __future__ import annotations

import inspect
import json
import sys

import click
import torch
from rich.console import Console
from rich.table import Table

from tokensieve.cli_demo import demo, show
from tokensieve.cli_methods import patch_or_refuse, read_method
from tokensieve.cli_tasks import evaluate, train
from tokensieve.loading import load_checkpoint, load_model

DEFAULT_METHODS = ("topk:keep=0.7", "evit:keep=0.7", "dynamicvit:keep=0.7", "tome:r=13")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POSITIVE = click.IntRange(min=1)


@click.group()
@click.version_option(package_name="tokensieve")
def main() -> None:
    """Token pruning for Vision Transformers: measure what it saves."""


@main.command()
@click.argument("model")
@click.argument("methods", nargs=-1)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A timm checkpoint file to load into a timm MODEL.")
@click.option("--image-size", type=_POSITIVE, default=None,
              help="Input side in pixels (default: the model's); a timm model is built for it.")
@click.option("--batch", type=_POSITIVE, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def flops(model: str, methods: tuple[str, ...], checkpoint: str | None, image_size: int | None,
          batch: int, seed: int, as_json: bool) -> None:
    """MACs per sample of MODEL, dense and with each method (random input).

    MODEL is a timm model name (built with random weights) or a transformers model directory.
    METHODS are NAME:key=value,... e.g. evit:keep=0.7,fuse=False  tome:r=13
    topk:keep=0.5,layers=(3,6,9)  dynamicvit:keep=0.7 (default: all four).
    """
    from tokensieve.flops import flops as count

    configs = [read_method(m) for m in methods or DEFAULT_METHODS]
    net = _load(model, checkpoint, image_size)
    size = image_size or _default_size(net)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    inputs = _inputs(net, pixels)
    rows = []
    for config in configs:
        patch_or_refuse(net, config)
        try:
            report = count(net, inputs)
        except ValueError as error:  # the method or the model refusing this input
            raise click.UsageError(f"{config} on {model}: {error}") from error
        rows.append({"method": str(config), **report.to_dict()})
    if as_json:
        payload = {"model": model, "image_size": size, "batch": batch, "results": rows}
        click.echo(json.dumps(payload, indent=2))
        return
    table = Table(title=f"{model} at {size}x{size}: MACs per sample (FLOPs = 2 x MACs)")
    for column in ("method", "GMACs", "backbone", "overhead", "dense", "reduction"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in rows:
        table.add_row(row["method"], f"{row['macs'] / 1e9:.3f}", f"{row['backbone_macs'] / 1e9:.3f}",
                      f"{row['overhead_macs'] / 1e6:.2f} M", f"{row['dense_macs'] / 1e9:.3f}",
                      f"{row['ratio']:.2f}x")
    _console().print(table)


@main.command()
@click.argument("model")
@click.argument("methods", nargs=-1)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A timm checkpoint file to load into a timm MODEL.")
@click.option("--batch", type=_POSITIVE, default=1, show_default=True)
@click.option("--image-size", type=_POSITIVE, default=None,
              help="Input side in pixels (default: the model's); a timm model is built for it.")
@click.option("--threads", type=_POSITIVE, default=None, help="torch threads (default: torch's choice).")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeats", type=_POSITIVE, default=20, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--prepack", is_flag=True,
              help="Run the patched model inside tokensieve.prepacked (weights fixed while timing).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(model: str, methods: tuple[str, ...], checkpoint: str | None, batch: int,
          image_size: int | None, threads: int | None, dtype: str, device: str, repeats: int,
          warmup: int, prepack: bool, as_json: bool) -> None:
    """Speed of MODEL with each method against its own forward and against itself with pruning
    disabled, interleaved in this process.

    MODEL is a timm model name (built with random weights) or a transformers model directory.
    METHODS are NAME:key=value,... as for `tokensieve flops` (default: all four).
    """
    from tqdm import tqdm

    from tokensieve.bench import benchmark
    from tokensieve.patch import unpatch

    configs = [read_method(m) for m in methods or DEFAULT_METHODS]
    net = _load(model, checkpoint, image_size)
    if image_size is not None and _needs_interpolation(net, image_size):
        raise click.BadParameter(
            f"bench calls the model on pixels alone, and this transformers model takes another size than its "
            f"config's {_default_size(net)} only with interpolate_pos_encoding=True; time it at its own size "
            "(leave --image-size out), or save it with image_size in its config", param_hint="--image-size")
    for config in configs:  # every method fits the model before any timing starts
        patch_or_refuse(net, config)
        unpatch(net)
    results = []
    for config in tqdm(configs, desc="benchmarking", unit="method", disable=as_json, file=sys.stderr):
        try:
            results.append(benchmark(net, config, batch=batch, image_size=image_size, repeats=repeats,
                                     warmup=warmup, threads=threads, dtype=_DTYPES[dtype], device=device,
                                     prepack=prepack))
        except ValueError as error:  # the method or the model refusing this input
            raise click.UsageError(f"{config} on {model}: {error}") from error
    if as_json:
        click.echo(json.dumps({"model": model, "results": [r.to_dict() for r in results]}, indent=2))
        return
    first = results[0]
    table = Table(title=f"{model}: batch {first.batch}, {first.image_size}px, {first.threads} threads, "
                        f"{first.dtype}, {first.device}{', prepacked' if prepack else ''}; "
                        f"medians of {first.repeats}")
    for column in ("method", "MACs ratio", "host ms", "unpruned ms", "pruned ms", "speedup",
                   "pruning speedup", "rounds 25-75%", "efficiency", "overhead"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for r in results:
        low, high = r.pruning_speedup_range
        table.add_row(r.method, f"{r.flops_ratio:.2f}x", f"{r.host_ms:.1f}", f"{r.unpruned_ms:.1f}",
                      f"{r.pruned_ms:.1f}", f"{r.speedup:.2f}x", f"{r.pruning_speedup:.2f}x",
                      f"{low:.2f}-{high:.2f}x", f"{r.efficiency:.2f}", f"{r.overhead_share:.1%}")
    _console().print(table)
    click.echo("speedup = host's own forward / pruned; pruning speedup = the same patched model with "
               "pruning disabled / pruned; rounds 25-75% = quartiles of that ratio over single "
               "back-to-back rounds; efficiency = pruning speedup / MACs ratio; overhead = share of the "
               "pruned forward spent in the method's own steps")


def _console() -> Console:
    # Piped output gets room for whole method names instead of a terminal's 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=170)


def _load(model: str, checkpoint: str | None, image_size: int | None) -> torch.nn.Module:
    try:
        net = load_model(model, image_size=image_size)
    except (ValueError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="MODEL") from error
    if checkpoint is not None:
        try:
            load_checkpoint(net, checkpoint, model)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--checkpoint") from error
    return net.eval()


def _default_size(net: torch.nn.Module) -> int:
    """The model's own input side; a model tokensieve cannot patch is a usage error."""
    from tokensieve.hosts import resolve_host

    try:
        return resolve_host(net).spec.image_size
    except TypeError as error:
        raise click.BadParameter(str(error), param_hint="MODEL") from error


def _needs_interpolation(net: torch.nn.Module, size: int) -> bool:
    """Whether the model takes `size` pixels only when asked to interpolate its position embeddings
    (transformers' ViT, DeiT, CLIP and BLIP at a size other than their config's)."""
    takes_flag = "interpolate_pos_encoding" in inspect.signature(net.forward).parameters
    return takes_flag and size != _default_size(net)


def _inputs(net: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | bool]:
    """`pixels` as `net` takes them at their size."""
    if _needs_interpolation(net, pixels.shape[-1]):
        return {"pixel_values": pixels, "interpolate_pos_encoding": True}
    return pixels


main.add_command(train)
main.add_command(evaluate)
main.add_command(demo)
main.add_command(show)

if __name__ == "__main__":
    main()

"""Wall-clock speed of a pruned model against its host and its unpruned self, measured in one process."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tokensieve.calls import prepacked
from tokensieve.flops import flops
from tokensieve.hosts import resolve_host
from tokensieve.methods import Method
from tokensieve.patch import inputs as call_inputs
from tokensieve.patch import is_patched, method_timing, patch, pruning_disabled, sieve_of, unpatch


@dataclass
class BenchResult:
    """Medians of interleaved forwards of one input batch through three models: the host's own
    forward (`host`), the patched model with pruning disabled (`unpruned`: the same executor,
    every token kept) and the patched model pruning (`pruned`)."""

    method: str
    batch: int
    image_size: int
    threads: int
    dtype: str
    device: str
    repeats: int
    prepacked: bool  # the patched model ran inside `tokensieve.prepacked`
    host_ms: float
    unpruned_ms: float
    pruned_ms: float
    speedup: float  # host time / pruned time (medians): what a user of the host gains
    # Quartiles of the per-round ratios (timed back to back): how much a single comparison moves
    # on this machine, e.g. with other load on the memory bus.
    speedup_range: tuple[float, float]
    pruning_speedup: float  # unpruned time / pruned time: what pruning alone gains
    pruning_speedup_range: tuple[float, float]
    flops_ratio: float  # dense MACs / pruned MACs (method overhead included)
    gmacs: float  # pruned, per sample
    dense_gmacs: float
    overhead_share: float  # the method's own steps (scoring, selection, merging) / pruned forward

    @property
    def efficiency(self) -> float:
        """Pruning's own speedup over the MACs ratio: 1.0 turns every MAC saved into time saved."""
        return self.pruning_speedup / self.flops_ratio

    def to_dict(self) -> dict:
        return {**asdict(self), "efficiency": self.efficiency}


def benchmark(model: nn.Module, method: Method | None = None, batch: int = 1, image_size: int | None = None,
              repeats: int = 20, warmup: int = 3, threads: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              prepack: bool = False, pixels: torch.Tensor | None = None,
              inputs: Mapping[str, torch.Tensor] | None = None) -> BenchResult:
    """Time `model`'s own forward, and a copy patched with `method` with pruning disabled and
    enabled, on the same batch.

    Without `method`, `model` must be patched: a copy of it is timed as it is, with its method,
    its learned parts and their state (SViT's calibrated thresholds) and its `dense` setting, and
    the host is a copy with the patch taken off. `pixels` is the batch to time (its size and side
    are the result's `batch` and `image_size`); without it, a random normal batch of `batch`
    images of side `image_size` (the model's own size when None).

    The three forwards alternate (each round in another order) after `warmup` rounds, and the
    medians are compared; `model` itself is left as it was. With `prepack`, the patched copy runs
    inside `tokensieve.prepacked`. Then the pruned model runs `repeats` more times with the
    method's own steps timed, for the overhead share. `inputs` are the per-call inputs the method
    reads (VLTP's guidance, one row per image), given to every call of the patched copy.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be at least 1, warmup at least 0")
    if method is None and not is_patched(model):
        raise ValueError("benchmark needs a method, e.g. benchmark(model, EViT(keep=0.7)), or patch the "
                         "model first (tokensieve.patch) to time it as patched")
    host_model = _dense_copy(model).to(device=device, dtype=dtype).eval()
    host = resolve_host(host_model)
    pixels = _pixels(pixels, batch, image_size, host.spec.image_size, device, dtype)
    batch, size = pixels.shape[0], pixels.shape[-1]
    if method is None:  # the caller's patch, parts and all; a copy, so the caller's model stays as it was
        pruned = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        sieve_of(pruned).to(device=device, dtype=dtype).eval()  # the parts are no submodule of the model
        method = sieve_of(pruned).method
    else:
        pruned = copy.deepcopy(host_model)
        patch(pruned, method)

    def unpruned(x: torch.Tensor) -> torch.Tensor:
        with pruning_disabled(pruned):
            return pruned(x)

    runs = {"host": host_model, "unpruned": unpruned, "pruned": pruned}
    given = {name: value.to(device=device, dtype=dtype) for name, value in (inputs or {}).items()}
    with (_threads(threads) as used, torch.inference_mode(),
          prepacked(pruned) if prepack else contextlib.nullcontext(),
          call_inputs(pruned, **given) if given else contextlib.nullcontext()):
        report = flops(pruned, pixels)
        dense_report = flops(host_model, pixels)
        times = interleaved_times({name: functools.partial(run, pixels) for name, run in runs.items()},
                                  repeats, warmup, device)
        with method_timing(pruned) as method_seconds:
            timed = [_time_one(pruned, pixels, device) for _ in range(repeats)]
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return BenchResult(
        method=str(method), batch=batch, image_size=size, threads=used,
        dtype=str(dtype).removeprefix("torch."), device=str(device), repeats=repeats, prepacked=prepack,
        host_ms=ms["host"], unpruned_ms=ms["unpruned"], pruned_ms=ms["pruned"],
        speedup=ms["host"] / ms["pruned"], speedup_range=_round_ratios(times["host"], times["pruned"]),
        pruning_speedup=ms["unpruned"] / ms["pruned"],
        pruning_speedup_range=_round_ratios(times["unpruned"], times["pruned"]),
        flops_ratio=dense_report.macs / report.macs,
        gmacs=report.macs / 1e9, dense_gmacs=dense_report.macs / 1e9,
        overhead_share=(method_seconds[0] / repeats) / statistics.median(timed),
    )


def machine(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and its widest vector instructions (from Linux's cpuinfo), for a
    result's set-up line: speed ratios differ from one CPU to another."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open(cpuinfo_path, encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    widest = [label for label, flag in (("AMX", "amx_tile"), ("AVX-512", "avx512f"), ("AVX2", "avx2"))
              if flag in flags]
    return f"{name} ({', '.join(widest)})" if widest else name


def interleaved_times(runs: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                      device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds of each of `runs` (calls of models on a fixed batch) in each of `rounds` rounds,
    after `warmup` rounds: each round calls every run once, in another order each round, so that
    none always follows another's cache traffic. Compare their medians."""
    orders = list(itertools.permutations(runs))
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        for name in orders[i % len(orders)]:
            _synchronize(device)
            start = time.perf_counter()
            runs[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _pixels(pixels: torch.Tensor | None, batch: int, size: int | None, default_size: int,
            device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The batch to time: the caller's, or `batch` random normal images of side `size`."""
    if pixels is None:
        size = size or default_size
        return torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if pixels.ndim != 4 or pixels.shape[0] < 1:
        raise ValueError(f"pixels of shape {tuple(pixels.shape)}: give a batch [B, 3, H, W] of at least one "
                         "image")
    if batch not in (1, pixels.shape[0]) or size not in (None, pixels.shape[-2], pixels.shape[-1]):
        raise ValueError(f"pixels of shape {tuple(pixels.shape)} disagree with batch={batch}, "
                         f"image_size={size}; leave batch and image_size out when giving pixels")
    return pixels.to(device=device, dtype=dtype)


def _round_ratios(slower: list[float], faster: list[float]) -> tuple[float, float]:
    return _quartiles([a / b for a, b in zip(slower, faster, strict=True)])


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def _dense_copy(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model)
    unpatch(dense)
    return dense


def _time_one(model: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
              device: str | torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(pixels)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

"""Wall-clock speed of a pruned model against its dense self, measured in one process."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tokensieve.flops import flops
from tokensieve.hosts import resolve_host
from tokensieve.methods import Method
from tokensieve.patch import method_timing, patch, unpatch


@dataclass
class BenchResult:
    """Medians of interleaved dense and pruned forwards of one input batch."""

    method: str
    batch: int
    image_size: int
    threads: int
    dtype: str
    device: str
    repeats: int
    dense_ms: float
    pruned_ms: float
    speedup: float  # dense time / pruned time (medians)
    # Quartiles of the per-round ratios (dense / pruned, timed back to back): how much a single
    # comparison moves on this machine, e.g. with other load on the memory bus.
    speedup_range: tuple[float, float]
    flops_ratio: float  # dense MACs / pruned MACs (method overhead included)
    gmacs: float  # pruned, per sample
    dense_gmacs: float
    overhead_share: float  # the method's own steps (scoring, selection, merging) / pruned forward

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(model: nn.Module, method: Method, batch: int = 1, image_size: int | None = None,
              repeats: int = 20, warmup: int = 3, threads: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BenchResult:
    """Time `model` dense and patched with `method` on the same random batch.

    Dense and pruned forwards alternate (order flipped every repeat) after `warmup` rounds, and
    the medians are compared; `model` itself is left as it was. Then the pruned model runs
    `repeats` more times with the method's own steps timed, for the overhead share.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be at least 1, warmup at least 0")
    dense = _dense_copy(model).to(device=device, dtype=dtype).eval()
    host = resolve_host(dense)
    size = image_size or host.spec.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    pruned = copy.deepcopy(dense)
    patch(pruned, method)
    with _threads(threads) as used, torch.inference_mode():
        report = flops(pruned, pixels)
        dense_report = flops(dense, pixels)
        for _ in range(warmup):
            dense(pixels)
            pruned(pixels)
        dense_times, pruned_times = [], []
        for i in range(repeats):
            pair = ((dense, dense_times), (pruned, pruned_times))
            for net, times in pair if i % 2 == 0 else reversed(pair):
                times.append(_time_one(net, pixels, device))
        ratios = [d / p for d, p in zip(dense_times, pruned_times, strict=True)]
        with method_timing(pruned) as method_seconds:
            timed = [_time_one(pruned, pixels, device) for _ in range(repeats)]
    dense_ms = statistics.median(dense_times) * 1e3
    pruned_ms = statistics.median(pruned_times) * 1e3
    return BenchResult(
        method=str(method), batch=batch, image_size=size, threads=used,
        dtype=str(dtype).removeprefix("torch."), device=str(device), repeats=repeats,
        dense_ms=dense_ms, pruned_ms=pruned_ms,
        speedup=dense_ms / pruned_ms, speedup_range=_quartiles(ratios),
        flops_ratio=dense_report.macs / report.macs,
        gmacs=report.macs / 1e9, dense_gmacs=dense_report.macs / 1e9,
        overhead_share=(method_seconds[0] / repeats) / statistics.median(timed),
    )


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def _dense_copy(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model)
    unpatch(dense)
    return dense


def _time_one(model: nn.Module, pixels: torch.Tensor, device: str | torch.device) -> float:
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

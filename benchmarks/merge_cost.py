"""What one ToMe merge step costs on DeiT-S at batch 1, in the model and alone.

ToMe's matching and merging are about 25 small tensor operations per block. Timed back to back
they are cheap; inside the model each runs right after the block's attention and matrix
products, with the caches full of other data. This script captures the step's real inputs at
every block of one forward and times the step (1) inside the forward, (2) alone back to back,
(3) alone after the block's first MLP matrix product, and (4) alone after writing a 32 MB
buffer (more than the L3 cache of most CPUs this runs on). Medians over rounds, summed over the
12 blocks.

    python benchmarks/merge_cost.py          # writes benchmarks/results/merge_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

import tokensieve as ts

FLUSH_BYTES = 32 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    ts.patch(model, ts.ToMe(r=args.r))
    method = ts.sieve_of(model).method
    step = method.after_attention
    pixels = torch.randn(1, 3, 224, 224)
    calls: dict[int, tuple] = {}
    in_model: dict[int, list[float]] = {}

    def timed_step(layer, state, attn, ctx):
        calls[layer] = (layer, state, attn, ctx)
        start = time.perf_counter()
        out = step(layer, state, attn, ctx)
        in_model.setdefault(layer, []).append(time.perf_counter() - start)
        return out

    object.__setattr__(method, "after_attention", timed_step)  # the frozen config, for this run only
    fc1 = model.blocks[0].mlp.fc1
    hidden = torch.randn(197, fc1.in_features)
    flush = torch.empty(FLUSH_BYTES // 4)
    before = {"alone, back to back": lambda: None,
              "alone, after the block's fc1 product": lambda: F.linear(hidden, fc1.weight, fc1.bias),
              f"alone, after writing {FLUSH_BYTES >> 20} MB": lambda: flush.fill_(1.0)}
    with torch.inference_mode():
        for _ in tqdm(range(args.rounds), desc="in the model"):
            model(pixels)
        rows = {"inside the forward": sum(statistics.median(t) for t in in_model.values())}
        for name, prepare in before.items():
            rows[name] = _alone(step, calls, prepare, args.rounds, name)
    table = _table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_cost.md").write_text(table)
    print(table)


def _alone(step: Callable, calls: dict[int, tuple], prepare: Callable[[], object], rounds: int,
           name: str) -> float:
    """Median seconds of each block's step, run alone after `prepare`, summed over the blocks."""
    times: dict[int, list[float]] = {layer: [] for layer in calls}
    for _ in tqdm(range(rounds), desc=name):
        for layer, arguments in calls.items():
            prepare()
            start = time.perf_counter()
            step(*arguments)
            times[layer].append(time.perf_counter() - start)
    return sum(statistics.median(t) for t in times.values())


def _table(rows: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        f"# ToMe(r={args.r}) merge step on DeiT-S, batch 1",
        "",
        f"Produced by `python benchmarks/merge_cost.py` ({args.threads} threads, fp32, random weights, "
        f"medians of {args.rounds} rounds per block, summed over the 12 blocks; torch {torch.__version__}). "
        "The step is ToMe's `after_attention`: matching on the keys, the size-weighted merge, the "
        "new positions.",
        "",
        "| where the step runs | ms per forward |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds * 1e3:.2f} |" for name, seconds in rows.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

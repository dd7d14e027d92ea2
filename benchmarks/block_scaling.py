"""How fast can pruning make DeiT-S, running the host's own blocks on fewer tokens?

A pruned forward runs each block of the host on fewer tokens. On a CPU at batch 1 a block's time
does not fall in proportion to its token count: its weights are read whatever the count, and
each operation has a fixed cost. This script runs an *oracle* of each method: the host's own
blocks, in order, each half (attention half: norm, attention, residual; MLP half: norm, MLP,
residual) on the first n tokens, where n is what the method's trace gives at that point. It has
no cost of its own (no scoring, gathering or merging). A second oracle, the *view oracle*, runs
the same schedule through tokensieve's own block calls (`TimmBlockView`, as the executor runs
them): the unpruned patched model over it is the most pruning's own speedup can be at those
token counts, and the patched model's distance from it is the cost of the method's own steps.
The host, the patched model with pruning disabled, both oracles and the pruned model are timed
interleaved in this process, after warm-up, as medians.

    python benchmarks/block_scaling.py                # batch 1: benchmarks/results/block_scaling.md
    python benchmarks/block_scaling.py --prepack      # inside ts.prepacked: block_scaling-prepacked.md
    python benchmarks/block_scaling.py --batch 32 --repeats 10   # block_scaling-batch32.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from speed import target_efficiency  # benchmarks/ is this script's own path
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

import tokensieve as ts
from tokensieve.hosts.timm_vit import TimmBlockView

METHODS = [ts.TopK(keep=0.7), ts.EViT(keep=0.7), ts.DynamicViT(keep=0.7), ts.ToMe(r=13)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds (one call of each forward)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepack", action="store_true",
                        help="the patched model and the views inside ts.prepacked")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    pixels = torch.randn(args.batch, 3, 224, 224)
    views = [TimmBlockView(block) for block in model.blocks]
    rows = []
    for method in METHODS:
        patched = copy.deepcopy(model)  # outside inference mode: its weights stay normal tensors
        ts.patch(patched, method)

        def unpruned(m: nn.Module = patched) -> Tensor:
            with ts.pruning_disabled(m):
                return m(pixels)

        packing = ts.prepacked(model, patched) if args.prepack else contextlib.nullcontext()
        with torch.inference_mode(), packing:
            schedule = _schedule(patched, pixels)
            forwards = {"host": lambda: model(pixels),
                        "unpruned": unpruned,
                        "oracle": lambda s=schedule: _oracle(model, pixels, s),
                        "view oracle": lambda s=schedule: _view_oracle(model, views, pixels, s),
                        "pruned": lambda m=patched: m(pixels)}
            seconds = _medians(forwards, args.repeats, str(method))
            ratio = ts.flops(model, pixels).macs / ts.flops(patched, pixels).macs
            rows.append((method, ratio, seconds))
    table = _table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-prepacked" if args.prepack else "") + (f"-batch{args.batch}" if args.batch != 1 else "")
    (args.out / f"block_scaling{suffix}.md").write_text(table)
    print(table)


def _schedule(patched: nn.Module, pixels: Tensor) -> list[tuple[int, int]]:
    """(attention tokens, MLP tokens) of each block in the patched model's forward (the same in
    every sample: these methods keep equal counts)."""
    with ts.trace(patched) as traces:
        patched(pixels)
    trace = traces[-1]
    return list(zip(trace.attention_tokens()[:, 0].tolist(), trace.kept_tokens()[:, 0].tolist(), strict=True))


def _oracle(model: nn.Module, pixels: Tensor, schedule: list[tuple[int, int]]) -> Tensor:
    """timm's VisionTransformer forward with each block half cut to the schedule's first tokens."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    for block, (attention_tokens, mlp_tokens) in zip(model.blocks, schedule, strict=True):
        x = x[:, :attention_tokens]
        x = x + block.ls1(block.attn(block.norm1(x)))
        x = x[:, :mlp_tokens]
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def _view_oracle(model: nn.Module, views: list[TimmBlockView], pixels: Tensor,
                 schedule: list[tuple[int, int]]) -> Tensor:
    """`_oracle` with each block run through tokensieve's calls on it, as the executor runs it."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    for view, (attention_tokens, mlp_tokens) in zip(views, schedule, strict=True):
        x = x[:, :attention_tokens]
        heads_out = F.scaled_dot_product_attention(*view.qkv(x), scale=view.scale)
        x = x + view.attention_branch(heads_out.transpose(1, 2).flatten(2))
        x = x[:, :mlp_tokens]
        x = x + view.mlp_branch(x)
    return model.forward_head(model.norm(x))


def _medians(forwards: dict[str, Callable[[], object]], repeats: int, name: str) -> dict[str, float]:
    """Median seconds of each forward over interleaved rounds, the order rotating every round."""
    for call in forwards.values():
        for _ in range(3):
            call()
    names = list(forwards)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(repeats), desc=name):
        for n in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            forwards[n]()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(values) for n, values in times.items()}


def _table(rows: list[tuple[ts.Method, float, dict[str, float]]], args: argparse.Namespace) -> str:
    command = " ".join(["python benchmarks/block_scaling.py", *sys.argv[1:]])
    lines = [
        f"# DeiT-S at batch {args.batch}: the speedup pruning's token counts allow",
        "",
        f"Produced by `{command}` ({args.threads} threads, fp32, 224², random weights, medians of "
        f"{args.repeats} interleaved rounds per method; torch {torch.__version__}"
        + ("; the patched model and the view oracle inside `tokensieve.prepacked`" if args.prepack else "")
        + "). *Host*: timm's own forward. *Unpruned*: the patched model with pruning disabled. "
        "*Oracle*: the host's own blocks run on the token counts of the method's trace, with no cost of "
        "the method's own (scoring, gathering, merging); its efficiency is host / oracle over the MACs "
        "ratio. *View oracle*: the same schedule through tokensieve's calls on each block, as the "
        "executor runs them; its efficiency, unpruned / view oracle over the MACs ratio, is the most "
        "pruning's own speedup can reach at these token counts. *Pruned*: the patched model; its "
        "efficiency is pruning's own speedup (unpruned / pruned) over the MACs ratio, and *of ceiling* "
        "that efficiency over the view oracle's: what the method's own steps leave of it.",
        "",
        "| method | MACs ratio | host ms | unpruned ms | oracle ms | oracle efficiency | view oracle ms "
        "| ceiling efficiency | pruned ms | pruning efficiency | of ceiling | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, ratio, s in rows:
        oracle = s["host"] / s["oracle"] / ratio
        ceiling = s["unpruned"] / s["view oracle"] / ratio
        pruning = s["unpruned"] / s["pruned"] / ratio
        target = target_efficiency("DeiT-S", method, args.batch)
        ms = {name: f"{seconds * 1e3:.1f}" for name, seconds in s.items()}
        cells = [str(method), f"{ratio:.2f}x", ms["host"], ms["unpruned"], ms["oracle"], f"{oracle:.2f}",
                 ms["view oracle"], f"{ceiling:.2f}", ms["pruned"], f"{pruning:.2f}",
                 f"{pruning / ceiling:.0%}", "" if target is None else f"≥ {target:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

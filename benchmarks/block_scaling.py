"""How fast can pruning make DeiT-S at batch 1, running the host's own blocks?

A pruned forward runs each block of the host on fewer tokens. On a CPU at batch 1 a block's time
does not fall in proportion to its token count: its weights are read whatever the count, and
each operation has a fixed cost. This script runs an *oracle* of each method: the host's own
blocks, in order, each half (attention half: norm, attention, residual; MLP half: norm, MLP,
residual) on the first n tokens, where n is what the method's trace gives at that point. It has
no cost of its own (no scoring, gathering or merging), so dense time over its time is the
speedup the host's blocks allow at those token counts. A second oracle runs the same schedule
through tokensieve's own block calls (`TimmBlockView`: prepacked linears, idle sub-modules
skipped), so the patched model's distance from it is the cost of the method's own steps alone.
Dense, both oracles and the patched model are timed interleaved in this process, after warm-up,
as medians.

    python benchmarks/block_scaling.py            # writes benchmarks/results/block_scaling.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    pixels = torch.randn(1, 3, 224, 224)
    views = [TimmBlockView(block) for block in model.blocks]
    rows = []
    for method in METHODS:
        patched = copy.deepcopy(model)  # outside inference mode: its weights stay normal tensors
        ts.patch(patched, method)
        with torch.inference_mode():
            schedule = _schedule(patched, pixels)
            forwards = {"dense": lambda: model(pixels),
                        "oracle": lambda s=schedule: _oracle(model, pixels, s),
                        "view oracle": lambda s=schedule: _view_oracle(model, views, pixels, s),
                        "patched": lambda m=patched: m(pixels)}
            seconds = _medians(forwards, args.repeats, str(method))
            ratio = ts.flops(model, pixels).macs / ts.flops(patched, pixels).macs
            rows.append((method, ratio, seconds))
    table = _table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_scaling.md").write_text(table)
    print(table)


def _schedule(patched: nn.Module, pixels: Tensor) -> list[tuple[int, int]]:
    """(attention tokens, MLP tokens) of each block in the patched model's forward."""
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
    lines = [
        "# DeiT-S at batch 1: the speedup the host's blocks allow",
        "",
        f"Produced by `python benchmarks/block_scaling.py` ({args.threads} threads, fp32, 224², random "
        f"weights, medians of {args.repeats} interleaved rounds per method; torch {torch.__version__}). "
        "*Oracle*: the host's own blocks run on the token counts of the method's trace, with no cost "
        "of the method's own (scoring, gathering, merging). *View oracle*: the same, through "
        "tokensieve's calls on each block (prepacked linears, idle sub-modules skipped), the ceiling "
        "of the patched model. *Patched*: tokensieve's pruned model. "
        "Speedups are over dense (timm's own forward), efficiencies are speedups over the MACs ratio.",
        "",
        "| method | MACs ratio | dense ms | oracle ms | oracle speedup | oracle efficiency "
        "| view oracle ms | view oracle speedup | view oracle efficiency | patched ms "
        "| patched speedup | patched efficiency | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, ratio, s in rows:
        cells = [str(method), f"{ratio:.2f}x", f"{s['dense'] * 1e3:.1f}"]
        for name in ("oracle", "view oracle", "patched"):
            speedup = s["dense"] / s[name]
            cells += [f"{s[name] * 1e3:.1f}", f"{speedup:.2f}x", f"{speedup / ratio:.2f}"]
        cells.append(f"≥ {target_efficiency('DeiT-S', method, 1):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

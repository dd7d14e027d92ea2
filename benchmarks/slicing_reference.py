"""How far is a pruned forward from the plainest one with the same token counts?

Times, interleaved in one process (medians after warm-up, random weights, fp32, 224x224): timm's
dense DeiT-S; the same timm blocks with the tokens cut to the counts TopK(keep=0.7) keeps, by
slicing, between attention and MLP of blocks 3, 6 and 9 (no scoring, no gather: the least a
pruned forward can cost); and tokensieve's TopK(keep=0.7). The gap between the last two is what
the executor and the method's scoring add.

    python benchmarks/slicing_reference.py --batch 1 --repeats 60
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import tokensieve as ts

METHOD = ts.TopK(keep=0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224").eval()
    pruned = copy.deepcopy(dense)
    ts.patch(pruned, METHOD)
    pixels = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), ts.trace(pruned) as traces:
        pruned(pixels)
    counts = {record.layer: int(record.mlp_tokens) for record in traces[0].layers
              if record.mlp_tokens != record.attention_tokens}
    runs = {"timm dense": lambda: dense(pixels), "timm sliced": lambda: _sliced(dense, pixels, counts),
            str(METHOD): lambda: pruned(pixels)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(5):
            for run in runs.values():
                run()
        for i in range(args.repeats):
            for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    print(f"DeiT-S, batch {args.batch}, {args.threads} threads, medians of {args.repeats}; "
          f"tokens after blocks {counts}")
    base = statistics.median(times["timm dense"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} {median * 1e3:8.1f} ms   speedup {base / median:.3f}x")


def _sliced(model: torch.nn.Module, pixels: torch.Tensor, counts: dict[int, int]) -> torch.Tensor:
    """timm's forward with the tokens cut to `counts` after attention of the listed blocks."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    for layer, block in enumerate(model.blocks):
        if layer in counts:
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, : counts[layer]]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        else:
            x = block(x)
    return model.forward_head(model.norm(x))


if __name__ == "__main__":
    main()

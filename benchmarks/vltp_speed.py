"""VLTP's speed on a SAM ViT-B-sized encoder at 1024×1024, the size SAM runs at (random weights).

The encoder is transformers' `SamVisionModel` at width 768, 12 blocks, windows of 14 and global
attention in blocks 2, 5, 8 and 11 (4 096 tokens); VLTP's pruning decoder (256 wide as in the
paper, `--width` for another; 8 heads, 2 two-way layers, one decoder for all stages) rates the map
before blocks 2, 5 and 8, guided by one random 256-wide vector per image, and the keep share of
every stage is the one (searched on the MACs count, decoder included) whose encoder MACs are
`--budget` of dense (default 0.6: −40%).
`ts.benchmark` times the host's forward, the patched encoder with pruning disabled, and pruned, at
batch 1, interleaved after warm-up, and compares medians (fp32, `--threads` threads); the pruned
encoder is then run again with the method's own steps timed, for the decoder's share of the
pruned forward. Never run it beside other work. Writes benchmarks/results/vltp_speed.md and .json
("-quick" with fewer rounds).

    python benchmarks/vltp_speed.py            # 20 rounds (about 10 minutes on 2 cores)
    python benchmarks/vltp_speed.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

import tokensieve as ts
from tokensieve.bench import machine

IMAGE = 1024
STAGES = (2, 5, 8)
GUIDANCE_WIDTH = 256
TARGET_EFFICIENCY = 0.9  # pruning's own speedup over the MACs ratio, at batch 1
DECODER_SHARE_GOAL = 0.03


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          window_size=14, global_attn_indexes=(2, 5, 8, 11), image_size=IMAGE,
                                          patch_size=16,
                                          # SAM's default 1e-10 leaves every weight ~0 and the tokens
                                          # near-equal; the decoder's ranking would be numerical noise
                                          initializer_range=0.02)
    return transformers.SamVisionModel(config).eval()


def keep_for(model: torch.nn.Module, budget: float, pixels: torch.Tensor, guidance: torch.Tensor,
             width: int) -> float:
    """The keep share, to 0.005, whose MACs (decoder included) come closest to `budget` of dense."""
    def share(keep: float) -> float:
        patched = ts.patch(model, _method(keep, width), dense=True)
        try:
            with ts.inputs(model, guidance=guidance):
                report = ts.flops(model, pixels)
        finally:
            ts.unpatch(model)
        del patched
        return report.macs / report.dense_macs

    low, high = 0.05, 1.0
    while high - low > 0.005:  # MACs fall as keep falls
        middle = (low + high) / 2
        low, high = (middle, high) if share(middle) < budget else (low, middle)
    return round(min((low, high), key=lambda keep: abs(share(keep) - budget)), 3)


def _method(keep: float, width: int) -> ts.VLTP:
    return ts.VLTP(keep=keep, layers=STAGES, guidance_width=GUIDANCE_WIDTH, width=width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.6, help="share of the dense encoder MACs")
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    parser.add_argument("--width", type=int, default=256, help="the pruning decoder's width (the paper's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = f"CPU: {machine()}"
    model = build()
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    guidance = torch.randn(1, GUIDANCE_WIDTH, generator=torch.Generator().manual_seed(2))
    keep = keep_for(model, args.budget, pixels, guidance, args.width)
    ts.patch(model, _method(keep, args.width), dense=True)
    with ts.inputs(model, guidance=guidance):
        report = ts.flops(model, pixels)
    repeats = 5 if args.quick else 20
    result = ts.benchmark(model, pixels=pixels, repeats=repeats, warmup=2, threads=args.threads,
                          inputs={"guidance": guidance})
    record = {
        "command": " ".join(["python benchmarks/vltp_speed.py", *sys.argv[1:]]), "setup": setup,
        "keep": keep, "stages": STAGES, "width": args.width, "macs_share": report.macs / report.dense_macs,
        "decoder_macs_share": report.overhead_macs / report.macs,
        "efficiency": result.pruning_speedup / result.flops_ratio, **asdict(result),
    }
    width = "" if args.width == 256 else f"-width{args.width}"
    path = args.out / f"vltp_speed{width}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(record))
    print(path.with_suffix(".md").read_text())


def _markdown(r: dict) -> str:
    met = "met" if r["efficiency"] >= TARGET_EFFICIENCY else "not met"
    share_met = "met" if r["overhead_share"] <= DECODER_SHARE_GOAL else "not met"
    return "\n".join([
        "# VLTP on a SAM ViT-B-sized encoder at 1024×1024",
        "",
        f"Produced by `{r['command']}` (random weights, batch 1, fp32, {r['threads']} threads, "
        f"{r['repeats']} interleaved rounds, medians; {r['setup']}). VLTP(keep={r['keep']}) before blocks "
        f"{', '.join(map(str, r['stages']))}, one {r['width']}-wide decoder, guided by a random vector.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| encoder MACs vs dense (decoder included) | {r['macs_share']:.3f} ({r['gmacs']:.1f} of "
        f"{r['dense_gmacs']:.1f} GMACs) |",
        f"| MACs ratio | {r['flops_ratio']:.2f}× |",
        f"| pruning's own speedup (against the patched encoder, pruning disabled) | "
        f"**{r['pruning_speedup']:.2f}×** (rounds {r['pruning_speedup_range'][0]:.2f}–"
        f"{r['pruning_speedup_range'][1]:.2f}) |",
        f"| speedup over the host's forward | {r['speedup']:.2f}× |",
        f"| efficiency (pruning's speedup / MACs ratio; target ≥ {TARGET_EFFICIENCY}) | "
        f"**{r['efficiency']:.2f}**: {met} |",
        f"| the method's steps' share of the pruned forward's time (goal ≤ {DECODER_SHARE_GOAL:.0%}) | "
        f"{r['overhead_share']:.1%}: {share_met} |",
        f"| the decoder's share of the pruned forward's MACs | {r['decoder_macs_share']:.1%} |",
        f"| times (ms): host, unpruned, pruned | {r['host_ms']:.0f}, {r['unpruned_ms']:.0f}, "
        f"{r['pruned_ms']:.0f} |",
        "",
    ])


if __name__ == "__main__":
    main()

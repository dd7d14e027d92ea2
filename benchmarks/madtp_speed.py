"""MADTP's speed on BLIP-base-sized towers (random weights): both towers pruned per instance.

The model is transformers' `BlipForImageTextRetrieval` (the nlvr reference model's class) at
BLIP-base size: a ViT-B/16 vision tower at 384×384 (577 tokens, 12 layers, width 768) and a
12-layer BERT-base text encoder cross-attending to the image tokens, on texts of 20 to 35 tokens
(a padded batch). MADTP (100 alignment tokens, every layer of both towers, ragged per-instance
counts) has its T set on the timed batch so that both towers together spend `--budget` of their
dense MACs (default 0.3: −70%, the paper's operating point; with random weights any T > 0
already spends under half).

Three forwards of the whole model (image–text matching score) are timed on the same batch,
interleaved after warm-up, and their medians compared (fp32, `--threads` threads): the host's own
forward, the patched towers with pruning disabled, and pruned. Pruning's own speedup is the
unpruned time over the pruned; its efficiency is that speedup over the MACs ratio (both towers,
MADTP's own work included). The issue's bars: ≥ 0.9 at batch 1, ≥ 0.85 at batch 8. Never run it
beside other work. Writes benchmarks/results/madtp_speed.md and .json ("-quick" with fewer rounds).

    python benchmarks/madtp_speed.py            # 10 rounds per batch (about 15 minutes on 2 cores)
    python benchmarks/madtp_speed.py --quick    # 3 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve.reference.vl import START_ID, build_nlvr, nlvr_config

IMAGE = 384
WIDTH = 768
TEXT_LENGTHS = (20, 35)  # tokens per text, inclusive
TARGET_EFFICIENCY = {1: 0.9, 8: 0.85}
ORDERS = list(itertools.permutations(("host", "unpruned", "pruned")))


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=12, num_hidden_layers=12)
    config = nlvr_config(vision={**base, "image_size": IMAGE}, text={**base, "encoder_hidden_size": WIDTH},
                         projection=256)
    return build_nlvr(config).eval()


def inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and texts of 20 to 35 tokens (right-padded to the longest; the ids are the
    reference models' words, whose vocabulary is small: the embedding costs no MACs either way)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(TEXT_LENGTHS[0], TEXT_LENGTHS[1] + 1, (batch,), generator=generator)
    width = int(lengths.max())
    ids = torch.randint(1, START_ID, (batch, width), generator=generator)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),
            "input_ids": ids * mask, "attention_mask": mask}


def towers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.vision_model, model.text_encoder]


def measure(batch: int, budget: float, rounds: int, warmup: int) -> dict:
    host = build()
    pruned = copy.deepcopy(host)
    ts.patch(towers(pruned), ts.MADTP())
    given = inputs(batch)
    calibration = ts.calibrate_temperature(pruned, [given], macs_budget=budget)
    macs = sum(report.macs for report in ts.tower_flops(pruned, towers(pruned), given))
    dense = sum(report.macs for report in ts.tower_flops(host, towers(host), given))

    def unpruned() -> None:
        with contextlib.ExitStack() as stack:
            for tower in towers(pruned):
                stack.enter_context(ts.pruning_disabled(tower))
            pruned(**given)

    runs = {"host": lambda: host(**given), "unpruned": unpruned, "pruned": lambda: pruned(**given)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for i in range(rounds):
            for name in ORDERS[i % len(ORDERS)]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    flops_ratio = dense / macs
    pruning_speedup = ms["unpruned"] / ms["pruned"]
    result = {
        "batch": batch, "budget": budget, "temperature": calibration.temperature, "rounds": rounds,
        "host_ms": ms["host"], "unpruned_ms": ms["unpruned"], "pruned_ms": ms["pruned"],
        "gmacs": macs / 1e9, "dense_gmacs": dense / 1e9, "flops_ratio": flops_ratio,  # per sample
        "speedup": ms["host"] / ms["pruned"], "pruning_speedup": pruning_speedup,
        "efficiency": pruning_speedup / flops_ratio, "target_efficiency": TARGET_EFFICIENCY[batch],
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.3, help="share of both towers' dense MACs")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (not for the docs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, warmup = (3, 1) if args.quick else (10, 2)
    results = [measure(batch, args.budget, rounds, warmup) for batch in TARGET_EFFICIENCY]
    command = " ".join(["python benchmarks/madtp_speed.py", *sys.argv[1:]])
    budget = "" if args.budget == 0.3 else f"-{args.budget:g}"
    path = args.out / f"madtp_speed{'-quick' if args.quick else ''}{budget}"
    path.with_suffix(".json").write_text(json.dumps({"command": command, "threads": args.threads,
                                                     "results": results}, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(results, command, args.threads))
    print(path.with_suffix(".md").read_text())


def _markdown(results: list[dict], command: str, threads: int) -> str:
    lines = [
        "# MADTP's speed on BLIP-base-sized towers (random weights)",
        "",
        f"Produced by `{command}` (fp32, {threads} threads, medians of interleaved rounds after warm-up). "
        f"ViT-B/16 vision tower at {IMAGE}×{IMAGE} and a 12-layer BERT-base text encoder with "
        f"cross-attention, texts of {TEXT_LENGTHS[0]}–{TEXT_LENGTHS[1]} tokens; MADTP on both towers with "
        "per-instance counts, T set on the timed batch to the budget. GMACs per sample, both towers, "
        "MADTP's own work included. Efficiency: pruning's own speedup (against the same patched towers "
        "with pruning disabled) over the MACs ratio.",
        "",
        "| batch | T | GMACs | dense GMACs | MACs ratio | host ms | unpruned ms | pruned ms | speedup over "
        "the host | pruning's own speedup | efficiency | bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = "met" if r["efficiency"] >= r["target_efficiency"] else "not met"
        lines.append(f"| {r['batch']} | {r['temperature']:.3g} | {r['gmacs']:.2f} | {r['dense_gmacs']:.2f} | "
                     f"{r['flops_ratio']:.2f}× | {r['host_ms']:.0f} | {r['unpruned_ms']:.0f} | "
                     f"{r['pruned_ms']:.0f} | {r['speedup']:.2f}× | {r['pruning_speedup']:.2f}× | "
                     f"{r['efficiency']:.2f} | ≥ {r['target_efficiency']}: {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

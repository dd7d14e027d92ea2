"""SViT's speed on dense-prediction inputs: DeiT-S and a SAM ViT-B-sized encoder at 512x512.

Random weights, fp32, CPU. Each model is patched with `ts.SViT(keep=0.7)` (DeiT-S: dense, as a
detector or segmenter needs it, and the headline; and sparse; the SAM encoder always runs dense),
its untrained gates' thresholds are set by `ts.calibrate` on seeded calibration images, so
that the gates keep 0.7, 0.49 and 0.343 of the patch tokens on average, and then
`ts.benchmark(patched, pixels=...)` times, interleaved after warm-up, the host's own forward, the
patched model with pruning disabled and the pruned model, on other images drawn the same way.

Per-image counts. Trained gates keep what holds detail (objects) and drop flat background, so
their counts follow how much of each image is busy; images of plain noise are all drawn alike and
hold no such difference. The timed and calibration
images here are *scenes*: a smooth background (random colours at 4x4, bilinearly upsampled) with
a seeded share of the 16x16 cells, drawn per image uniformly in [BUSY_LOW, BUSY_HIGH], covered by
unit noise. The script measures and writes the per-image spread both ways (noise, and the
scenes it times); no weight is altered.

The SAM encoder runs at 512x512 (1 024 tokens, the same input as DeiT-S) rather than SAM's own
1024x1024: four times the tokens make one batch-16 forward take minutes on 2 CPU cores, too long
to time over repeats here. Its batch-1 rows at 1024x1024 are a run of their own (about an hour).

    python benchmarks/svit_speed.py             # every model, batch 1 and 16, with and without prepack
    python benchmarks/svit_speed.py --quick     # fewer repeats, without prepack
    python benchmarks/svit_speed.py --model deit --batch 1
    python benchmarks/svit_speed.py --model sam --batch 1 --image-size 1024   # SAM at its own size
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import transformers
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

import tokensieve as ts
from tokensieve.bench import machine
from tokensieve.patch import runner_of

KEEP = 0.7
IMAGE = 512
SAM_IMAGE = 1024  # the size SAM runs at; its batch-1 rows come from `--model sam --batch 1 --image-size 1024`
CELL = 16  # the patch side of both models: one busy/flat cell per token
BUSY_LOW, BUSY_HIGH = 0.2, 0.9  # the share of busy cells, per image
CALIBRATION_IMAGES = 8  # 8 192 patch tokens at 512x512, for each gate's quantile
CALIBRATION_SEED, NOISE_CHECK_SEED, TIMED_SEED = 1, 2, 3
MIN_PRUNING_SPEEDUP_BATCH_1 = 1.46  # SViT's backbone speedup (DeiT-S, batch 1)
TARGET_EFFICIENCY = {1: 0.90, 16: 0.85}  # pruning's own speedup / MACs ratio
REPEATS = {1: 30, 16: 5}
QUICK_REPEATS = {1: 8, 16: 2}
WARMUP = {1: 3, 16: 1}


@dataclass(frozen=True)
class Setting:
    name: str  # the row's model column
    key: str  # --model
    dense: bool
    headline: bool


SETTINGS = [
    Setting("DeiT-S", "deit", dense=True, headline=True),
    Setting("DeiT-S", "deit", dense=False, headline=False),
    Setting("SAM ViT-B encoder", "sam", dense=True, headline=False),  # SAM always runs dense
]


def build(key: str, image: int) -> nn.Module:
    """The host with random weights, built for `image`x`image` inputs."""
    torch.manual_seed(0)
    if key == "deit":
        return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=image).eval()
    config = transformers.SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          window_size=14, global_attn_indexes=(2, 5, 8, 11), image_size=image,
                                          patch_size=CELL,
                                          # SAM's default 1e-10 leaves every weight ~0: the tokens
                                          # near-equal, and the gates' ranking of them numerical noise
                                          initializer_range=0.02)
    return transformers.SamVisionModel(config).eval()


def scenes(count: int, image: int, seed: int) -> Tensor:
    """`count` images: a smooth background with a per-image share of busy (noise) cells."""
    generator = torch.Generator().manual_seed(seed)
    background = F.interpolate(torch.randn(count, 3, 4, 4, generator=generator), size=(image, image),
                               mode="bilinear", align_corners=False)
    busy_share = BUSY_LOW + (BUSY_HIGH - BUSY_LOW) * torch.rand(count, 1, 1, 1, generator=generator)
    cells = (torch.rand(count, 1, image // CELL, image // CELL, generator=generator) < busy_share).float()
    busy = F.interpolate(cells, scale_factor=CELL, mode="nearest")
    return background + busy * torch.randn(count, 3, image, image, generator=generator)


def noise(count: int, image: int, seed: int) -> Tensor:
    return torch.randn(count, 3, image, image, generator=torch.Generator().manual_seed(seed))


def kept_shares(model: nn.Module, pixels: Tensor) -> dict[int, list[float]]:
    """Each gated block's share of every image's patch tokens that the gate before it kept."""
    runner = runner_of(model)
    layers = list(runner.method.schedule(runner.host.spec.depth))
    with torch.inference_mode(), ts.trace(model) as traces:
        model(pixels)
    record = traces[-1]
    patches = record.input_tokens - record.prefix
    tokens = record.attention_tokens()  # [layers, B]: tokens entering each block's attention
    return {layer: ((tokens[layer] - record.prefix).double() / patches).tolist() for layer in layers}


def spread(shares: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    """Per gate: the mean, standard deviation, least and most of the per-image kept shares."""
    out = {}
    for layer, values in shares.items():
        v = torch.tensor(values, dtype=torch.float64)
        std = float(v.std()) if v.numel() > 1 else 0.0
        out[str(layer)] = {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max())}
    return out


def median_image(model: nn.Module, pixels: Tensor) -> Tensor:
    """The image of `pixels` whose MACs are the batch's median (the lower of the two middle ones),
    as a batch of one: a typical image rather than whichever comes first."""
    macs = torch.tensor(ts.flops(model, pixels).per_sample)
    middle = macs.argsort()[(macs.numel() - 1) // 2]
    return pixels[int(middle)][None]


def measure(setting: Setting, args: argparse.Namespace, timed: Tensor) -> tuple[dict, list[dict]]:
    """One setting: the per-image spread on noise and on scenes, then one `ts.benchmark` row per
    batch and prepack choice."""
    model = build(setting.key, args.image_size)
    ts.patch(model, ts.SViT(keep=KEEP), dense=setting.dense)
    label = f"{setting.name} ({'dense' if setting.dense else 'sparse'})"
    # Untrained gates on plain noise: how far apart are the per-image counts?
    ts.calibrate(model, noise(CALIBRATION_IMAGES, args.image_size, CALIBRATION_SEED))
    noise_spread = spread(kept_shares(model, noise(len(timed), args.image_size, NOISE_CHECK_SEED)))
    result = ts.calibrate(model, scenes(CALIBRATION_IMAGES, args.image_size, CALIBRATION_SEED))
    calibration = {"model": label, "thresholds": result.thresholds, "shares": result.shares,
                   "calibration_macs_ratio": result.dense_macs / result.macs,
                   "noise_spread": noise_spread, "timed_spread": spread(kept_shares(model, timed))}
    print("\n".join(_spread_table(calibration)))
    inputs = {1: median_image(model, timed), len(timed): timed}
    batches = (args.batch,) if args.batch else tuple(REPEATS)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    rows = []
    for batch in batches:
        for prepack in (False,) if args.quick else (False, True):
            tqdm.write(f"{label}, batch {batch}{', prepacked' if prepack else ''}")
            bench = ts.benchmark(model, pixels=inputs[batch], repeats=repeats[batch],
                                 warmup=WARMUP[batch], threads=args.threads, prepack=prepack)
            rows.append({"model": setting.name, "patch": "dense" if setting.dense else "sparse",
                         "headline": setting.headline,
                         "kept_per_image": spread(kept_shares(model, inputs[batch])), **bench.to_dict()})
    return calibration, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, and without prepack")
    parser.add_argument("--model", choices=sorted({s.key for s in SETTINGS}), help="this model only")
    parser.add_argument("--batch", type=int, choices=sorted(REPEATS), help="this batch size only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=IMAGE,
                        help=f"input side (default {IMAGE}; {SAM_IMAGE} for SAM's own size; a small one "
                             "only to check the script runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.image_size % CELL:
        parser.error(f"--image-size must be a multiple of {CELL}")
    torch.set_num_threads(args.threads)
    args.setup = f"CPU: {machine()}"
    timed = scenes(max(REPEATS), args.image_size, TIMED_SEED)  # batch 1 takes one of these
    calibrations, rows = [], []
    for setting in SETTINGS:
        if args.model in (None, setting.key):
            calibration, setting_rows = measure(setting, args, timed)
            calibrations.append(calibration)
            rows += setting_rows
    suffix = "".join([f"-{args.model}" if args.model else "", f"-batch{args.batch}" if args.batch else "",
                      "-quick" if args.quick else "",
                      f"-{args.image_size}px" if args.image_size != IMAGE else ""])
    command = " ".join(["python benchmarks/svit_speed.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "calibrations": calibrations, "rows": rows}
    (args.out / f"svit_speed{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    report = _markdown(rows, calibrations, args, command)
    (args.out / f"svit_speed{suffix}.md").write_text(report)
    print(report)


def meets(row: dict) -> tuple[bool | None, bool | None]:
    """(pruning's own speedup ≥ 1.46x, asked at batch 1; efficiency ≥ its batch's target)."""
    speedup = row["pruning_speedup"] >= MIN_PRUNING_SPEEDUP_BATCH_1 if row["batch"] == 1 else None
    target = TARGET_EFFICIENCY.get(row["batch"])
    return speedup, None if target is None else row["efficiency"] >= target


def _yes(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "NO"


def _stat(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def _spread_table(calibration: dict) -> list[str]:
    images = "the timed batch"
    lines = [f"Per-image kept share at each gate, {calibration['model']}: mean ± std [min, max] over "
             f"{images}, noise (calibrated on noise) and scenes (calibrated on scenes, timed):", "",
             "| gate before block | noise | scenes (timed) |", "|---:|---|---|"]
    for layer, scene in calibration["timed_spread"].items():
        lines.append(f"| {layer} | {_stat(calibration['noise_spread'][layer])} | {_stat(scene)} |")
    return [*lines, ""]


def _sam_size_note(size: int) -> str:
    if size == SAM_IMAGE:
        return f"SAM's own input size, {SAM_IMAGE}x{SAM_IMAGE}"
    return (f"SAM's own {SAM_IMAGE}x{SAM_IMAGE} has {(SAM_IMAGE / size) ** 2:g} times the tokens, and one "
            "batch-16 forward then takes minutes on 2 cores")


def _markdown(rows: list[dict], calibrations: list[dict], args: argparse.Namespace, command: str) -> str:
    size, repeats = args.image_size, QUICK_REPEATS if args.quick else REPEATS
    setup = (
        f"Produced by `{command}`. {args.setup}; {args.threads} threads, torch {torch.__version__}, "
        f"timm {timm.__version__}, transformers {transformers.__version__}; random weights, fp32, "
        f"{size}x{size} ({(size // CELL) ** 2} tokens). DeiT-S is timm's `deit_small_patch16_224` "
        f"built at img_size={size}; the SAM encoder is transformers' `SamVisionModel` at width 768, "
        "12 blocks, 12 heads, windows of 14, global attention in blocks 2, 5, 8, 11, at the same "
        f"size ({_sam_size_note(size)}). Each is patched with `ts.SViT(keep={KEEP})`: DeiT-S dense (every "
        "position returned, as a detector's neck needs: the headline rows, in bold) and sparse; SAM "
        "always runs dense."
    )
    counts = (
        "**Thresholds and per-image counts.** The gates are untrained. `ts.calibrate` sets "
        f"their thresholds on {CALIBRATION_IMAGES} seeded calibration images (seed "
        f"{CALIBRATION_SEED}) so that they keep {KEEP}, {KEEP ** 2:.2f} and {KEEP ** 3:.3f} of the "
        "patch tokens on average; each image then keeps the tokens its gates rate above the "
        "thresholds, its own count. The counts are measured first on plain noise (calibrated on "
        "noise, counted on other noise), whose images are all drawn alike. Trained gates keep "
        "detail and drop flat background, so their counts follow each image's content; the "
        "calibration and timed images are therefore *scenes*: a smooth background (random colours "
        f"at 4x4, upsampled bilinearly) with a share of its {CELL}x{CELL} cells, drawn per image "
        f"uniformly in [{BUSY_LOW}, {BUSY_HIGH}], covered by unit noise. No weight is altered. The "
        f"timed batch is {max(REPEATS)} scenes (seed {TIMED_SEED}); batch 1 is its image of median "
        "MACs (the lower middle one), a typical image."
    )
    timing = (
        "**Timing.** `ts.benchmark(patched, pixels=...)`: three forwards of the batch interleaved "
        f"after warm-up (every order in turn), medians of {repeats[1]} rounds at batch 1 and "
        f"{repeats[16]} at batch 16: the host's own forward (*host*), the patched model with pruning "
        "disabled (*unpruned*: the same executor, every token kept) and the patched model pruning "
        "(*pruned*); *prepacked*: the patched model inside `ts.prepacked`. GMACs per image of the "
        "timed batch, the gates included. *Speedup* is host / pruned; *pruning* is unpruned / "
        "pruned, pruning's own backbone speedup; *efficiency* is pruning / MACs ratio (dense MACs / "
        f"pruned MACs). Targets: pruning ≥ {MIN_PRUNING_SPEEDUP_BATCH_1}x and efficiency ≥ "
        f"{TARGET_EFFICIENCY[1]:.2f} at batch 1, efficiency ≥ {TARGET_EFFICIENCY[16]:.2f} at batch "
        "16 (ragged per-image counts). *Kept at last gate*: the least and most per-image share of "
        "the patch tokens the last gate kept in the timed batch. *Rounds 25-75%*: the quartiles of "
        "pruning's speedup over single rounds."
    )
    lines = ["# SViT speed: DeiT-S and a SAM ViT-B-sized encoder on dense-prediction inputs", "",
             setup, "", counts, ""]
    for calibration in calibrations:
        lines += _spread_table(calibration)
    lines += [timing, "",
              "| model | patch | batch | prepacked | kept at last gate | GMACs | MACs ratio | host ms "
              "| unpruned ms | pruned ms | speedup | pruning | rounds 25-75% | ≥ 1.46x | efficiency "
              "| target | met |",
              "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    lines += [_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def _row(r: dict) -> str:
    last = list(r["kept_per_image"].values())[-1]
    speedup_met, efficiency_met = meets(r)
    low, high = r["pruning_speedup_range"]
    target = TARGET_EFFICIENCY.get(r["batch"])
    bold = "**" if r["headline"] else ""
    cells = [
        f"{bold}{r['model']}{bold}", r["patch"], str(r["batch"]), "yes" if r["prepacked"] else "no",
        f"{last['min']:.3f}-{last['max']:.3f}", f"{r['gmacs']:.2f}", f"{r['flops_ratio']:.2f}x",
        f"{r['host_ms']:.1f}", f"{r['unpruned_ms']:.1f}", f"{r['pruned_ms']:.1f}", f"{r['speedup']:.2f}x",
        f"{bold}{r['pruning_speedup']:.2f}x{bold}", f"{low:.2f}-{high:.2f}x", _yes(speedup_met),
        f"{bold}{r['efficiency']:.2f}{bold}", "" if target is None else f"≥ {target:.2f}",
        _yes(efficiency_met),
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()

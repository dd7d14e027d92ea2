"""Speed and MACs of every method on DeiT-S and ViT-B/16 (random weights, fp32, 224px, CPU).

Writes benchmarks/results/speed.md and speed.json. Each row is one `tokensieve.benchmark` call:
the host's own forward, the patched model with pruning disabled and the pruned model, interleaved
in this process after warm-up, medians over repeats.

    python benchmarks/speed.py                # the full table (about 40 minutes on 2 quiet cores)
    python benchmarks/speed.py --quick        # DeiT-S at batch 1 only
    python benchmarks/speed.py --quick --batch 32   # DeiT-S at batch 32 only (about 8 minutes)
    python benchmarks/speed.py --prepack      # the patched model inside tokensieve.prepacked
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import tokensieve as ts
from tokensieve.bench import machine

MODELS = {"DeiT-S": "deit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224"}
METHODS = [
    ts.TopK(keep=1.0),  # prunes nothing: the executor alone against the host's own forward
    ts.TopK(keep=0.7),
    ts.EViT(keep=0.7),
    ts.EViT(keep=0.5),
    ts.DynamicViT(keep=0.7),
    ts.ToMe(r=8),
    ts.ToMe(r=13),
    ts.ToMe(r=16),
]
# (method type, batch) -> least efficiency (pruning's own speedup / MACs ratio) asked of DeiT-S.
TARGETS = {
    ("TopK", 1): 0.90, ("TopK", 32): 0.95,
    ("EViT", 1): 0.90, ("EViT", 32): 0.95,
    ("ToMe", 1): 0.85, ("ToMe", 32): 0.95,
    ("DynamicViT", 1): 0.85, ("DynamicViT", 32): 0.95,
}
REPEATS = {1: 50, 32: 5}
WARMUP = {1: 5, 32: 1}


def target_efficiency(model: str, method: ts.Method, batch: int) -> float | None:
    if model != "DeiT-S" or getattr(method, "keep", None) == 1.0:  # keep=1.0 prunes nothing
        return None
    return TARGETS.get((type(method).__name__, batch))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="DeiT-S only, at batch 1 unless --batch")
    parser.add_argument("--batch", type=int, choices=sorted(REPEATS), help="this batch size only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepack", action="store_true", help="the patched model inside ts.prepacked")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    setup = f"CPU: {machine()}"
    models = {"DeiT-S": MODELS["DeiT-S"]} if args.quick else MODELS
    batches = (args.batch,) if args.batch else (1,) if args.quick else tuple(REPEATS)
    runs = [(m, b, method) for m in models for b in batches for method in METHODS]
    torch.manual_seed(0)
    built = {name: timm.create_model(arch, pretrained=False).eval() for name, arch in models.items()}
    rows = []
    for name, batch, method in tqdm(runs, desc="speed", unit="run"):
        result = ts.benchmark(built[name], method, batch=batch, repeats=REPEATS[batch],
                              warmup=WARMUP[batch], threads=args.threads, prepack=args.prepack)
        rows.append({"model": name, "target": target_efficiency(name, method, batch), **result.to_dict()})
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (("-quick" if args.quick else "") + (f"-batch{args.batch}" if args.batch else "")
              + ("-prepacked" if args.prepack else ""))
    (args.out / f"speed{suffix}.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = _markdown(rows, args.threads, " ".join(["python benchmarks/speed.py", *sys.argv[1:]]), setup)
    (args.out / f"speed{suffix}.md").write_text(table)
    print(table)


def _markdown(rows: list[dict], threads: int, command: str, setup: str) -> str:
    prepacked = rows[0]["prepacked"]
    lines = [
        "# Speed: pruned vs unpruned vs the host, same process",
        "",
        f"Produced by `{command}`. {setup}; {threads} threads, torch {torch.__version__}, "
        f"timm {timm.__version__}; random weights, fp32, "
        "224x224. Three forwards of one batch interleaved after warm-up (every order in turn): timm's "
        "own (*host*), the patched model with pruning disabled (*unpruned*: the same executor, every "
        "token kept) and the patched model pruning (*pruned*)"
        + ("; the patched model ran inside `tokensieve.prepacked`" if prepacked else "")
        + f". Medians of {REPEATS[1]} repeats at batch 1 and {REPEATS[32]} at batch 32. MACs per image "
        "(FLOPs = 2 x MACs), method overhead included. *Speedup* is host / pruned, what a user of the "
        "host gains; *pruning* is unpruned / pruned, what pruning alone gains. *Efficiency* is "
        "pruning / MACs ratio; *target* is the least efficiency asked of that setting, *overhead* the "
        "share of the pruned forward spent in the method's own steps (scoring, selection, merging, "
        "predictors). TopK(keep=1.0) prunes nothing: its *speedup* is tokensieve's executor against "
        "the host's own forward. *Rounds 25-75%*: the quartiles of pruning's speedup over single rounds, "
        "how far one comparison moves on this machine.",
        "",
        "| model | batch | method | GMACs | MACs ratio | host ms | unpruned ms | pruned ms | speedup "
        "| pruning | rounds 25-75% | efficiency | target | overhead |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        efficiency = r["efficiency"]
        target = "" if r["target"] is None else (
            f"≥ {r['target']:.2f} {'met' if efficiency >= r['target'] else 'MISSED'}")
        low, high = r["pruning_speedup_range"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['gmacs']:.2f} | {r['flops_ratio']:.2f}x "
            f"| {r['host_ms']:.1f} | {r['unpruned_ms']:.1f} | {r['pruned_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['pruning_speedup']:.2f}x | {low:.2f}-{high:.2f}x | {efficiency:.2f} "
            f"| {target} | {r['overhead_share']:.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

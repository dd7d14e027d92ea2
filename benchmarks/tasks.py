"""The reference task models on their test split: dense, random pruning, EViT, ToMe, DynamicViT.

Writes benchmarks/results/tasks.md and tasks.json. Each task's model is scored dense, then with
    - RandomDrop(keep=0.5, layers=(6,)): half the patch tokens, chosen at random, leave at the
      middle layer (dropped for cls; frozen in place for seg, whose head needs the whole grid);
    - EViT(keep=0.7) and ToMe(r=8) with their default settings, without training;
    - DynamicViT(keep=0.7) fine-tuned by `tokensieve train cls --method dynamicvit:keep=0.7`,
      when that run's directory exists.
The det model (Mask R-CNN on the ViT) is scored with the same controls on its ViT, patched in
dense mode as seg's is, and DynamicViT(keep=0.7) fine-tuned in dense mode by
`tokensieve train det --method dynamicvit:keep=0.7 --steps 200 --precision bf16` (batches of 8).
The tos model (a SAM image encoder: no class token, a neck that needs every cell) is scored with
the control that applies to it, RandomDrop at its middle layer (4 of 8). The nlvr (BLIP) and
retrieval (CLIP) models are pruned in their 6-layer vision towers: RandomDrop at the middle
layer (3), EViT at layers 1, 3 and 5 (the depth fractions of DeiT's 3, 6, 9), ToMe(r=8).

    python benchmarks/tasks.py                         # every task with shipped weights
    python benchmarks/tasks.py --tasks tos             # rescore tos, keep the other tasks' rows
    python benchmarks/tasks.py --tasks cls --samples 500
    python benchmarks/tasks.py --methods ToMe          # rescore dense and ToMe, keep the other rows
    python benchmarks/tasks.py --rewrite               # the table again from tasks.json, no scoring
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve.reference import TASKS, shipped_weights
from tokensieve.reference.compare import Row, compare

CONTROLS = [ts.RandomDrop(keep=0.5, layers=(6,)), ts.EViT(keep=0.7), ts.ToMe(r=8)]
VL_CONTROLS = [ts.RandomDrop(keep=0.5, layers=(3,)), ts.EViT(keep=0.7, layers=(1, 3, 5)), ts.ToMe(r=8)]
# SAM's encoder refuses class-attention and merging methods; its middle layer is 4 of 8.
TASK_CONTROLS = {"tos": [ts.RandomDrop(keep=0.5, layers=(4,))], "nlvr": VL_CONTROLS,
                 "retrieval": VL_CONTROLS}
TRAINED = {"cls": (ts.DynamicViT(keep=0.7), Path("runs/cls-dynamicvit-keep0.7")),
           "det": (ts.DynamicViT(keep=0.7), Path("runs/det-dynamicvit-keep0.7"))}
# the fine-tuned method's largest loss against dense, in points (det's row is reported, no target)
TRAINED_TARGETS = {"cls": 1}
DENSE_BAND = (0.6, 0.95)  # a dense reference model must be good but not saturated
# tasks with a band of their own: nlvr has two answers (chance 0.5); retrieval's R@1 depends on
# the gallery's size (the whole test split, chance 1/1 000), so it has none, only the pruning check
# the dense band; det's box AP averages IoU thresholds up to 0.95, so its band sits lower
DENSE_BANDS: dict[str, tuple[float, float] | None] = {"nlvr": (0.75, 0.95), "retrieval": None,
                                                      "det": (0.40, 0.90)}
# random pruning must cost at least this much (relative)
RANDOM_LOSS = {"seg": 0.10, "tos": 0.10, "nlvr": 0.10, "retrieval": 0.10, "det": 0.10}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="rescore only these methods (class names, e.g. ToMe EViT) and dense; the "
                             "other rows stay as the last run scored them")
    parser.add_argument("--samples", type=int, default=None, help="first N test samples (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rewrite", action="store_true",
                        help="write tasks.md again from tasks.json (its checks), scoring nothing")
    args = parser.parse_args()
    if args.rewrite:
        rows = [Row(**row) for row in json.loads((args.out / "tasks.json").read_text())]
        (args.out / "tasks.md").write_text(_markdown(rows, args))
        return
    torch.set_num_threads(args.threads)
    tasks = args.tasks or [t for t in TASKS if (shipped_weights(t) / "config.json").is_file()]
    rows: list[Row] = []
    for task in tasks:
        methods, trained = list(TASK_CONTROLS.get(task, CONTROLS)), {}
        if task in TRAINED and TRAINED[task][1].is_dir():
            method, run = TRAINED[task]
            methods.append(method)
            trained[str(method)] = str(run)
        if args.methods is not None:
            methods = _chosen(methods, args.methods)
            if not methods:  # nothing of this task's to rescore
                continue
        rows += compare(task, methods, split="test", samples=args.samples, trained=trained)
    rows = _with_earlier_rows(rows, args.out / "tasks.json")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tasks.json").write_text(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")
    (args.out / "tasks.md").write_text(_markdown(rows, args))
    print((args.out / "tasks.md").read_text())


def _chosen(methods: list[ts.Method], names: list[str]) -> list[ts.Method]:
    known = {type(method).__name__.lower() for method in CONTROLS + VL_CONTROLS}
    known |= {type(method).__name__.lower() for method, _ in TRAINED.values()}
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; the table scores "
                         f"{', '.join(sorted(known))}")
    wanted = {name.lower() for name in names}
    return [method for method in methods if type(method).__name__.lower() in wanted]


def _with_earlier_rows(rows: list[Row], earlier: Path) -> list[Row]:
    """`rows`, plus the rows of an earlier table that they do not score, in the earlier table's
    order (a rescored row takes its old row's place; new rows follow their task's)."""
    if not earlier.is_file():
        return sorted(rows, key=lambda row: TASKS.index(row.task))
    fresh = {(row.task, row.method): row for row in rows}
    merged = [fresh.pop((old["task"], old["method"]), None) or Row(**old)
              for old in json.loads(earlier.read_text())]
    merged += fresh.values()
    return sorted(merged, key=lambda row: TASKS.index(row.task))  # stable: methods keep their order


def _markdown(rows: list[Row], args: argparse.Namespace) -> str:
    split = "test split" if args.samples is None else f"first {args.samples} test samples"
    lines = [
        "# Reference task models: dense and pruned",
        "",
        f"Produced by `python benchmarks/tasks.py` ({split}, {args.threads} threads, fp32; each row "
        "comes from the last run that scored it, `--tasks` and `--methods` rescoring only theirs). "
        "Scores: cls accuracy, seg mIoU over the six shape classes, tos gIoU (mean per-sample IoU; cIoU, the "
        "split's total intersection over total union, under other scores), nlvr accuracy, retrieval "
        "R@1 (the mean of recall@1 image→text and text→image over the split as one gallery; each "
        "direction at 1 and 5 under other scores), det box AP (COCO's AP over IoU 0.5:0.95; box AP50 "
        "and mask AP under other scores). `vs dense` is relative. GMACs are the encoder's per image "
        "(FLOPs = 2 × MACs; det: the ViT, not the pyramid and heads; nlvr and retrieval: both towers' "
        "per image-text sample, the vision tower's and the text tower's, which BLIP's cross-attention "
        "to the kept image tokens makes depend on the vision tower's pruning, each in tasks.json's "
        "`tower_gmacs`), mean over 16 test samples.",
        "",
        "| task | method | score | vs dense | other scores | GMACs | check |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = {row.task: row.score for row in rows if row.method == "dense"}
    for row in rows:
        others = ", ".join(f"{name} {value:.4f}" for name, value in row.others.items())
        lines.append(f"| {row.task} | {row.method} | {row.score:.4f} | {row.relative:+.1%} | {others} "
                     f"| {row.gmacs:.3f} | {_check(row, dense[row.task])} |")
    return "\n".join(lines) + "\n"


def _check(row: Row, dense: float) -> str:
    if row.method == "dense":
        band = DENSE_BANDS.get(row.task, DENSE_BAND)
        if band is None:
            return ""
        low, high = band
        inside = low <= row.score <= high
        return f"dense in [{low}, {high}]: {'yes' if inside else 'NO'}"
    if row.method.startswith("RandomDrop") and row.task in RANDOM_LOSS:
        needed = RANDOM_LOSS[row.task]
        return f"loses ≥ {needed:.0%}: {'yes' if -row.relative >= needed else 'NO'}"
    if row.task in TRAINED_TARGETS and row.method == str(TRAINED[row.task][0]):
        points = TRAINED_TARGETS[row.task]
        return f"within {points:g} point of dense: {'yes' if dense - row.score <= points / 100 else 'NO'}"
    return ""


if __name__ == "__main__":
    main()

"""MADTP's training recipe, chosen on the validation split: how the budget is reached in training,
and whether the dense model's outputs teach the pruned one.

Each row fine-tunes the task's shipped model with MADTP toward one MACs budget (both towers, default
0.3: −70%) by `train_method`, for the same steps and learning rates as benchmarks/madtp_vl.py, and
differs from the first, madtp_vl.py's recipe, in one of two switches:

- *budget from the start*: T is set (on validation, for the untrained bank) to the budget before the
  first step and stays there; or *ramp*: the budget trained at falls linearly from dense to the
  target over the first half of the run, T set again every 25 steps on 128 training samples
  (`train_method(budget_ramp=0.5)`; the authors raise T between epochs toward their GFLOPs target);
- *self-distillation*: the task loss alone (with the alignment loss); or also 0.5 × the KL
  divergence to the same model run dense (`train_method(distill=True)`, what the vision-only
  baselines of madtp_vl.py train with).

Every row's T is then set on the validation split to the budget, and the row is scored on the
whole validation split (never the test split: this is a choice). Runs live under
runs/madtp-recipe-TASK/; a finished one is not trained again. Writes
benchmarks/results/madtp_recipe_TASK-val.md and .json.

    python benchmarks/madtp_recipe.py --task nlvr      # three runs of 7 to 14 minutes each here
    python benchmarks/madtp_recipe.py --task nlvr --steps 1200 --first-only   # twice the steps
    python benchmarks/madtp_recipe.py --task nlvr --first-only --start-layers 0 1   # block 0 unpruned too
    python benchmarks/madtp_recipe.py --task retrieval --first-only --budget 0.5 --steps 600

`--start-layers K ...` trains and scores each recipe with MADTP(start_layer=K) for each K: each
tower prunes from its block K on (madtp_vl.py's prunes from block 0, as the paper does); a budget
that no T reaches after training is reported as out of reach. Other steps than madtp_vl.py's write
files with a "-stepsN" suffix, other budgets "-budgetB", other start layers "-fromK-…", another
host learning rate (`--model-lr-scale`) "-hostlrS", `--first-only` "-first".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from madtp_vl import BATCH, DEFAULT_HOST_LR_SCALE, MACS_SAMPLES, SETUPS

import tokensieve as ts
from tokensieve.patch import patched_within
from tokensieve.reference import load_reference, train_method
from tokensieve.reference.compare import tower_macs
from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.tasks import make_dataset

RAMP = 0.5  # the share of the run over which the ramp lowers the budget


@dataclass(frozen=True)
class Recipe:
    name: str
    ramp: float
    distill: bool


RECIPES = (Recipe("budget from the start (madtp_vl.py's)", 0.0, False), Recipe("ramp", RAMP, False),
           Recipe("budget from the start + self-distillation", 0.0, True))


@dataclass
class Row:
    recipe: str
    score: float | None  # None: the budget is out of reach
    macs_share: float | None  # both towers, of dense, on the scored samples
    temperature: float | None
    start_layer: int | None = 0  # None: the dense model
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(SETUPS), default="nlvr")
    parser.add_argument("--budget", type=float, default=0.3, help="share of both towers' dense MACs")
    parser.add_argument("--steps", type=int, default=None, help="of every run (default: madtp_vl.py's)")
    parser.add_argument("--first-only", action="store_true",
                        help="only the first recipe (madtp_vl.py's), e.g. to see what more steps give")
    parser.add_argument("--model-lr-scale", type=float, default=DEFAULT_HOST_LR_SCALE,
                        help="the host's learning rate over the method's (1e-3)")
    parser.add_argument("--start-layers", type=int, nargs="+", default=[0],
                        help="the first block MADTP prunes in each tower: one set of runs for each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or SETUPS[args.task].steps
    runs = Path(f"runs/madtp-recipe-{args.task}")
    data = make_dataset(args.task, "val", image_size=IMAGE_SIZES[args.task])
    reference = load_reference(args.task).eval()
    dense = sum(tower_macs(reference, args.task, data, MACS_SAMPLES, BATCH).values())
    dense_score = evaluate(reference, args.task, data, batch_size=BATCH, progress=False)[METRICS[args.task]]
    rows = [Row("dense (the shipped model)", dense_score, 1.0, None, None)]
    for start_layer in args.start_layers:
        for recipe in RECIPES[:1] if args.first_only else RECIPES:
            name = f"budget{args.budget:g}-ramp{recipe.ramp:g}-distill{int(recipe.distill)}-steps{steps}"
            name += f"-from{start_layer}" if start_layer else ""
            name += "" if args.model_lr_scale == DEFAULT_HOST_LR_SCALE else f"-hostlr{args.model_lr_scale:g}"
            try:
                model = train_method(args.task, ts.MADTP(start_layer=start_layer), runs / name, steps=steps,
                                     model_lr_scale=args.model_lr_scale, precision="fp32",
                                     macs_budget=args.budget, progress=False, distill=recipe.distill,
                                     budget_ramp=recipe.ramp)
            except ts.BudgetOutOfReach as error:  # T is set to the budget before training and after it
                rows.append(Row(recipe.name, None, None, None, start_layer, f"out of reach: {error}"))
                print(rows[-1], flush=True)
                continue
            temperature = float(patched_within(model)[1].shared["bank"].temperature)  # set on validation
            score = evaluate(model, args.task, data, batch_size=BATCH, progress=False)[METRICS[args.task]]
            share = sum(tower_macs(model, args.task, data, MACS_SAMPLES, BATCH).values()) / dense
            rows.append(Row(recipe.name, score, share, temperature, start_layer))
            print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/madtp_recipe.py", *sys.argv[1:]])
    other = "" if steps == SETUPS[args.task].steps else f"-steps{steps}"
    other += "" if args.budget == 0.3 else f"-budget{args.budget:g}"
    other += "" if args.start_layers == [0] else "-from" + "-".join(map(str, args.start_layers))
    other += "" if args.model_lr_scale == DEFAULT_HOST_LR_SCALE else f"-hostlr{args.model_lr_scale:g}"
    stem = f"madtp_recipe_{args.task}{other}{'-first' if args.first_only else ''}-val"  # may hold a "."
    payload = {"command": command, "rows": [asdict(r) for r in rows]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(rows, args, steps, command))
    print((args.out / f"{stem}.md").read_text())


def _markdown(rows: list[Row], args: argparse.Namespace, steps: int, command: str) -> str:
    metric = METRICS[args.task]
    lines = [f"# MADTP's training recipe on {args.task}, at {args.budget:g} of both towers' dense MACs "
             "(validation split)", "",
             f"Produced by `{command}`: each row fine-tunes the shipped model with MADTP for "
             f"{steps} steps of 32 samples in fp32 (the method at 1e-3, the host at "
             f"{1e-3 * args.model_lr_scale:g}), then sets T on the validation split to the budget and "
             f"scores the whole validation split. MACs: both towers per sample, the mean over the first "
             f"{MACS_SAMPLES} samples.", "",
             "*Pruned from block*: MADTP's `start_layer`, the first block each tower prunes in.", "",
             f"| recipe | pruned from block | {metric} | MACs vs dense | T | note |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.score is None:
            lines.append(f"| {row.recipe} | {row.start_layer} | — | — | — | {row.note} |")
            continue
        start = "" if row.start_layer is None else row.start_layer
        temperature = "" if row.temperature is None else f"{row.temperature:.4g}"
        lines.append(f"| {row.recipe} | {start} | {row.score:.4f} | {row.macs_share:.3f} | {temperature} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

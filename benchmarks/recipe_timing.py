"""CPU-seconds of one training step of a reference model at each image size: what a recipe's
step counts are chosen from.

Each size runs a few steps of the recipe's batch (forward, backward, AdamW) on one torch thread,
after one warm-up step, and separately times generating and collating the batches. CPU time of
this process (not wall time) is reported, so other work on the machine changes the figures
little; on two uncontended cores a step then takes about (train + data) / 1.7 seconds
(docs/reference.md).

    python benchmarks/recipe_timing.py nlvr --sizes 112 224
    python benchmarks/recipe_timing.py retrieval --sizes 112 224 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from tokensieve.reference import RECIPES, Phase, build_model
from tokensieve.reference.recipes.auxiliary import AttributeHead
from tokensieve.reference.recipes.phases import phase_data, phase_objective  # the recipe's own step

TWO_CORES = 1.7  # an estimated speed-up of two threads over one on this machine, not measured


def time_size(task: str, size: int, steps: int, data: str | None) -> tuple[float, float]:
    """(train, data) CPU-seconds per step at `size`: the mean over `steps` after one warm-up, with
    the recipe's batch, attribute head and the objective of a phase on `data` (Phase.data)."""
    torch.manual_seed(0)
    recipe = RECIPES[task]
    batch_size = recipe.batch_size
    model = build_model(task)
    if recipe.attributes:
        model = AttributeHead(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    phase = Phase(size, steps + 1, 1e-4, 0, data=data)
    samples = phase_data(task, phase, (steps + 1) * batch_size)
    loss_fn, logits_of, collate = phase_objective(task, phase, recipe.attributes)
    start = time.process_time()
    batches = [collate([samples[i] for i in range(b * batch_size, (b + 1) * batch_size)])
               for b in range(steps + 1)]
    data_seconds = (time.process_time() - start) / (steps + 1)
    train_seconds = 0.0
    for number, (inputs, targets) in enumerate(batches):
        start = time.process_time()
        loss = loss_fn(logits_of(model(**inputs)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if number > 0:  # the first step pays for allocations and kernel selection
            train_seconds += time.process_time() - start
    return train_seconds / steps, data_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(RECIPES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default: the recipe's sizes")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", choices=("captions", "matching"), default=None,
                        help="time an nlvr warm-up phase instead of the task's own data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = RECIPES[args.task]
    sizes = args.sizes or [phase.image_size for phase in recipe.phases]
    print(f"{args.task}: batch {recipe.batch_size}, one thread, CPU-seconds per step")
    for size in sizes:
        train, data = time_size(args.task, size, args.steps, args.data)
        print(f"  {size:4d} px  train {train:6.2f}  data {data:5.2f}  "
              f"≈ {(train + data) / TWO_CORES:5.2f} s per step on two uncontended cores")


if __name__ == "__main__":
    main()

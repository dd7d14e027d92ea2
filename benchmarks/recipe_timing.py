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

from tokensieve.reference import RECIPES, build_model
from tokensieve.reference.training import _collate, _logits_of, _task_loss  # the recipe's own step
from tokensieve.tasks import make_dataset

TWO_CORES = 1.7  # an estimated speed-up of two threads over one on this machine, not measured


def time_size(task: str, size: int, batch_size: int, steps: int) -> tuple[float, float]:
    """(train, data) CPU-seconds per step at `size`: the mean over `steps` after one warm-up."""
    torch.manual_seed(0)
    model = build_model(task).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_dataset(task, "train", size=(steps + 1) * batch_size, image_size=size)
    collate, loss_fn, logits_of = _collate(task, size), _task_loss(task), _logits_of(task)
    start = time.process_time()
    batches = [collate([data[i] for i in range(b * batch_size, (b + 1) * batch_size)])
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = RECIPES[args.task]
    sizes = args.sizes or [phase.image_size for phase in recipe.phases]
    print(f"{args.task}: batch {recipe.batch_size}, one thread, CPU-seconds per step")
    for size in sizes:
        train, data = time_size(args.task, size, recipe.batch_size, args.steps)
        print(f"  {size:4d} px  train {train:6.2f}  data {data:5.2f}  "
              f"≈ {(train + data) / TWO_CORES:5.2f} s per step on two uncontended cores")


if __name__ == "__main__":
    main()

"""Has a vision-language model's vision tower collapsed? Mean cosine similarity of its tokens.

For 16 validation images of the task at 112×112: the mean cosine similarity between the patch
tokens of one image (near 1: every token says the same, the tower no longer sees the objects),
and between the mean tokens of different images; for nlvr also the spread (standard deviation
over the 16 statements) of the ITM head's "true" logit, near 0 when the model answers every
statement alike. Compares a fresh model, one started from the shipped seg backbone, and the
weights of training runs (with or without the recipe's attribute head).

    python benchmarks/feature_collapse.py nlvr --run runs/nlvr/phase-0-112px
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tokensieve.reference import build_model, load_recipe_phase
from tokensieve.reference.recipes.batches import task_collate
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import match_logits
from tokensieve.tasks import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("nlvr", "retrieval"))
    parser.add_argument("--run", action="append", default=[], help="a run (phase) directory; repeatable")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"fresh": build_model(args.task), "seg start": start_from_seg(build_model(args.task))}
    for run in args.run:
        models[run] = load_recipe_phase(build_model(args.task), run)
    data = make_dataset(args.task, "val", size=16, image_size=112)
    inputs, _ = task_collate(args.task, 112)([data[i] for i in range(16)])
    print(f"{'model':40s} {'tokens of an image':>20s} {'images':>8s} {'ITM spread':>11s}")
    for name, model in models.items():
        with torch.no_grad():
            tokens = model.eval().vision_model(pixel_values=inputs["pixel_values"],
                                               interpolate_pos_encoding=True).last_hidden_state
        patches = F.normalize(tokens[:, 1:], dim=-1)
        within = (patches @ patches.transpose(1, 2)).mean().item()
        means = F.normalize(tokens.mean(dim=1), dim=-1)
        across = (means @ means.T).mean().item()
        spread = "-"
        if args.task == "nlvr":
            with torch.no_grad():
                logits = match_logits(model, inputs["pixel_values"], inputs["input_ids"],
                                      inputs["attention_mask"])
            spread = f"{logits[:, 1].std().item():.4f}"
        print(f"{name:40s} {within:20.4f} {across:8.4f} {spread:>11s}")


if __name__ == "__main__":
    main()

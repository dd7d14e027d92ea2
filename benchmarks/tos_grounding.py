"""Does the tos model read the sentence? gIoU per sentence family, and with the sentences swapped.

Scores validation images with all their sentences (tasks.TosImages): the gIoU of each family,
and the gIoU when every mask is predicted from another sentence of the same image (the next one,
cyclically), against the target of its own. A model that ignores the sentence and outlines
likely objects scores the same both ways; one that grounds the sentence drops towards the
overlap of different targets.

    python benchmarks/tos_grounding.py                              # the shipped weights
    python benchmarks/tos_grounding.py --run runs/tos/phase-0-128px --size 128
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokensieve.reference import build_model, load_recipe_phase, load_reference
from tokensieve.reference.tos import TOS_IMAGE_SIZE
from tokensieve.tasks import TosImages, intersection_union, make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a recipe phase directory (default: the shipped weights)")
    parser.add_argument("--size", type=int, default=TOS_IMAGE_SIZE, help="image size to score at")
    parser.add_argument("--images", type=int, default=100, help="validation images (4 sentences each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_recipe_phase(build_model("tos"), args.run) if args.run else load_reference("tos")
    model.eval()
    queries = make_dataset("tos", "val", size=4 * args.images, image_size=args.size)
    loader = DataLoader(TosImages(queries), batch_size=10, collate_fn=list)
    own: dict[str, list[float]] = defaultdict(list)
    swapped: list[float] = []
    for items in tqdm(loader, desc="tos grounding"):
        images = torch.stack([item["image"] for item in items])
        counts = torch.tensor([len(item["texts"]) for item in items])
        image_of = torch.arange(len(items)).repeat_interleave(counts)
        targets = torch.cat([item["masks"] for item in items])
        texts = [text for item in items for text in item["texts"]]
        others = [text for item in items for text in item["texts"][1:] + item["texts"][:1]]
        with torch.no_grad():
            for sentences, scores in ((texts, None), (others, swapped)):
                predicted = model.predict(images, text=sentences, image_of=image_of)
                intersections, unions = intersection_union(predicted, targets)
                iou = (intersections / unions.clamp(min=1)).tolist()
                if scores is None:
                    families = [family for item in items for family in item["families"]]
                    for family, value in zip(families, iou, strict=True):
                        own[family].append(value)
                else:
                    scores.extend(iou)
    every = [value for values in own.values() for value in values]
    print(f"tos grounding: {args.images} validation images at {args.size} px, "
          f"{'run ' + args.run if args.run else 'shipped weights'}")
    print(f"{'sentences':24s} {'count':>6s} {'gIoU':>7s}")
    for family in sorted(own):
        print(f"{family:24s} {len(own[family]):6d} {sum(own[family]) / len(own[family]):7.4f}")
    print(f"{'all, own sentence':24s} {len(every):6d} {sum(every) / len(every):7.4f}")
    print(f"{'all, swapped sentence':24s} {len(swapped):6d} {sum(swapped) / len(swapped):7.4f}")


if __name__ == "__main__":
    main()

"""Can a model tell the shapes of the nlvr scenes apart at a given image size?

Every nlvr statement turns on the shape of some object ("there is a green triangle", "the star is
blue"). This script asks the shipped seg model, whose only job is to label each pixel with its
object's shape, for the shape of every object in nlvr validation scenes rendered at each size:
an object counts as right when the most frequent shape the model paints over its visible pixels
(background aside) is its own. Accuracy per size class (tasks/attributes.py: small objects
cover 0.8-1.6% of the image).

    python benchmarks/shape_resolution.py --sizes 112 160 224
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from tokensieve.reference import load_reference
from tokensieve.tasks.attributes import SHAPES, SIZE_CLASSES
from tokensieve.tasks.nlvr import NlvrDataset
from tokensieve.tasks.scenes import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 160, 224])
    parser.add_argument("--images", type=int, default=100, help="nlvr validation scenes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference("seg").eval()
    print(f"shipped seg model, {args.images} nlvr validation scenes: objects whose shape it names")
    print(f"{'size':>5s} " + " ".join(f"{name:>8s}" for name in [*SIZE_CLASSES, "all"]) + f" {'objects':>8s}")
    for size in args.sizes:
        right = _shapes_named(model, NlvrDataset("val", size=args.images, image_size=size))
        every = [value for values in right.values() for value in values]
        shares = [sum(right[name]) / max(len(right[name]), 1) for name in SIZE_CLASSES]
        print(f"{size:5d} " + " ".join(f"{share:8.3f}" for share in [*shares, sum(every) / len(every)])
              + f" {len(every):8d}")


@torch.no_grad()
def _shapes_named(model: torch.nn.Module, data: NlvrDataset) -> dict[str, list[bool]]:
    """Per size class, whether the model's majority shape over each visible object is right."""
    right: dict[str, list[bool]] = defaultdict(list)
    for index in range(len(data)):
        scene, _ = data.scene(index)
        rendering = render(scene)
        labels = model.predict(torch.from_numpy(rendering.image)[None])[0]
        instances = torch.from_numpy(rendering.instances)
        for number, obj in enumerate(scene.objects):
            painted = labels[(instances == number) & (labels > 0)]
            named = int(painted.mode().values) if painted.numel() else 0
            right[obj.size_class].append(named == 1 + SHAPES.index(obj.shape))  # seg class 0: background
    return right


if __name__ == "__main__":
    main()

"""Do the nlvr tower's patch tokens say which shape each object is?

BLIP's text encoder reads the image through cross-attention: a word's query picks tokens by a
linear key and takes a weighted mean of their linear values. So a statement can only find "the
star" if the star's tokens, alone or averaged over the object, tell stars from squares linearly.
The shipped seg model names shapes well (`benchmarks/shape_resolution.py`), but its head sees each
token's neighbours through two 3×3 convolutions; this script asks the tokens themselves.

The nlvr model's vision tower (`build_nlvr`, its six blocks started from the seg backbone as the
nlvr recipe starts) is read on nlvr training scenes at 224×224 by the three colour×shape readouts
of `reference.recipes.nlvr.perception.ObjectReadouts` (per position, the object mean, attention
over the object), trained on their class losses (`class_loss`); a position readout names an
object's shape right when the shape painted most over the object is its own.
With `--frozen` only the heads train (probes of the tokens the recipes start from); without it
the tower trains too, on these three losses alone. Shape accuracy per size class on 64
validation scenes every 100 steps, written to benchmarks/results/nlvr_perception-{frozen,trained}.json.

    python benchmarks/nlvr_perception.py --frozen --steps 500   # about 6 minutes on two threads
    python benchmarks/nlvr_perception.py --steps 1000           # about 24 minutes
    python benchmarks/nlvr_perception.py --frozen --layers 12   # the whole seg backbone, probed
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from tokensieve.reference.recipes.nlvr.perception import (
    MAX_OBJECTS,
    NlvrObjects,
    ObjectReadouts,
    class_loss,
    readouts_collate,
)
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import NLVR_VISION_LAYERS, build_nlvr, nlvr_config
from tokensieve.tasks.attributes import SHAPES, SIZE_CLASSES

SIZE = 224
VALIDATION = 64


def scenes(data: NlvrObjects, indices: range) -> tuple[dict, dict]:
    """The readouts' inputs and targets for these scenes."""
    return readouts_collate([data[index] for index in indices])


@torch.no_grad()
def shape_accuracy(readouts: ObjectReadouts, batch: tuple[dict, dict]) -> dict[str, dict[str, float]]:
    """Per readout and size class, the share of objects whose shape it names."""
    inputs, targets = batch
    was_training = readouts.training
    readouts.eval()
    logits = readouts(**inputs)
    maps, instances = targets["attributes"], targets["instances"]
    painted = F.interpolate(logits.positions, size=maps.shape[-2:], mode="bilinear").argmax(dim=1)
    readout_names = ("positions", "mean", "attention")
    right: dict[str, dict[str, list[bool]]] = {name: defaultdict(list) for name in readout_names}
    for row in range(len(instances)):
        for slot in range(MAX_OBJECTS):
            size = int(targets["sizes"][row, slot])
            if size < 0:
                continue
            size_class = list(SIZE_CLASSES)[size]
            shape = int(targets["classes"][row, slot]) % len(SHAPES)
            there = painted[row][(instances[row] == slot) & (painted[row] > 0)]
            named = (int(there.mode().values) - 1) % len(SHAPES) if there.numel() else -1
            right["positions"][size_class].append(named == shape)
            for name in ("mean", "attention"):
                named = int(getattr(logits, name)[row, slot].argmax()) % len(SHAPES)
                right[name][size_class].append(named == shape)
    readouts.train(was_training)
    return {readout: {name: round(sum(hits[name]) / len(hits[name]), 3) for name in SIZE_CLASSES}
            for readout, hits in right.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frozen", action="store_true", help="train the readouts only (probes)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 frozen, 5e-4 trained")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=NLVR_VISION_LAYERS,
                        help="blocks of the tower: the first of the seg backbone's 12 (default: the nlvr "
                             "model's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--save", type=Path, help="also write the tower's weights here (safetensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr = args.lr or (3e-3 if args.frozen else 5e-4)

    model = build_nlvr(nlvr_config(vision={"num_hidden_layers": args.layers}))
    start_from_seg(model)
    readouts = ObjectReadouts(model.vision_model)
    readouts.tower.requires_grad_(not args.frozen)
    trained = [p for p in readouts.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0 if args.frozen else 0.05)
    train = NlvrObjects("train", size=args.steps * args.batch, image_size=SIZE)
    held_out = scenes(NlvrObjects("val", size=VALIDATION, image_size=SIZE), range(VALIDATION))

    curve = [{"step": 0, "shape_accuracy": shape_accuracy(readouts, held_out)}]
    losses = []
    bar = tqdm(range(args.steps), desc="frozen" if args.frozen else "trained")
    for step in bar:
        inputs, targets = scenes(train, range(step * args.batch, (step + 1) * args.batch))
        loss = class_loss(readouts(**inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 100 == 0:
            point = {"step": step + 1, "loss": round(sum(losses) / len(losses), 3),
                     "shape_accuracy": shape_accuracy(readouts, held_out)}
            curve.append(point)
            losses = []
            bar.write(json.dumps(point))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layers == NLVR_VISION_LAYERS else f"-{args.layers}-layers"
    path = args.out / f"nlvr_perception-{'frozen' if args.frozen else 'trained'}{suffix}.json"
    run = {"layers": args.layers, "steps": args.steps, "batch": args.batch, "lr": lr, "size": SIZE,
           "validation_scenes": VALIDATION, "chance": round(1 / len(SHAPES), 3), "curve": curve}
    path.write_text(json.dumps(run, indent=1))
    print(f"wrote {path}")
    if args.save:
        weights = readouts.tower.state_dict()
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, args.save)
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()

"""Do the nlvr tower's patch tokens say which shape each object is?

BLIP's text encoder reads the image through cross-attention: a word's query picks tokens by a
linear key and takes a weighted mean of their linear values. So a statement can only find "the
star" if the star's tokens, alone or averaged over the object, tell stars from squares linearly.
The shipped seg model names shapes well (`benchmarks/shape_resolution.py`), but its head sees each
token's neighbours through two 3×3 convolutions; this script asks the tokens themselves.

The nlvr model's vision tower (`build_nlvr`, its six blocks started from the seg backbone as every
nlvr recipe starts) is read by three heads, on nlvr training scenes at 224×224:
- positions: a linear colour×shape class of each 4×4 pixel block (reference/auxiliary.py's
  attribute loss), an object right when the shape painted most over it is its own;
- mean: the tokens averaged over the object's visible part (each patch weighted by how much of it
  the object covers), classified linearly into colour×shape;
- attention: as a cross-attention that has found the object reads it: ATTENTION_HEADS learned
  queries attend over the patches the object covers (by linear keys, weighted by that cover), and
  a linear classifier reads their pooled tokens, so edge tokens can speak for the whole object.
With `--frozen` only the heads train (probes of the tokens the recipes start from); without it
the tower trains too, on these three losses alone. Shape accuracy per size class on 64
validation scenes every 100 steps, written to benchmarks/results/nlvr_perception-{frozen,trained}.json.

    python benchmarks/nlvr_perception.py --frozen --steps 500   # about 6 minutes on two threads
    python benchmarks/nlvr_perception.py --steps 1000           # about 24 minutes
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from tokensieve.reference.auxiliary import attribute_loss
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import build_nlvr
from tokensieve.tasks.attributes import SHAPES, SIZE_CLASSES
from tokensieve.tasks.nlvr import IGNORED, NlvrDataset
from tokensieve.tasks.scenes import ATTRIBUTE_CLASSES, attribute_class, attribute_map, render

MAX_OBJECTS = 12
ATTENTION_HEADS = 6
SIZE = 224
VALIDATION = 64


def scenes(data: NlvrDataset, indices: range) -> dict:
    """Images, colour×shape maps, visible-part maps and per-object classes of nlvr scenes."""
    images, maps, instances, sizes = [], [], [], []
    classes = torch.full((len(indices), MAX_OBJECTS), IGNORED, dtype=torch.long)  # no object in the slot
    for row, index in enumerate(indices):
        scene, _ = data.scene(index)
        rendering = render(scene)
        images.append(torch.from_numpy(rendering.image))
        maps.append(torch.from_numpy(attribute_map(scene, rendering)))
        instances.append(torch.from_numpy(rendering.instances.astype("int64")))
        for slot, obj in enumerate(scene.objects):
            classes[row, slot] = attribute_class(obj) - 1  # the object readouts have no background class
        sizes.append([obj.size_class for obj in scene.objects])
    return {"images": torch.stack(images), "maps": torch.stack(maps), "instances": torch.stack(instances),
            "classes": classes, "sizes": sizes}


class Readouts(nn.Module):
    """The tower and its three readouts: per position, the object mean, attention over the object."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        width = tower.config.hidden_size
        self.tower = tower
        self.positions = nn.Conv2d(width, ATTRIBUTE_CLASSES, kernel_size=1)
        self.mean = nn.Linear(width, ATTRIBUTE_CLASSES - 1)  # objects: no background class
        self.keys = nn.Linear(width, width)
        self.queries = nn.Parameter(torch.randn(ATTENTION_HEADS, width) / width**0.5)
        self.attention = nn.Linear(ATTENTION_HEADS * width, ATTRIBUTE_CLASSES - 1)

    def forward(self, images: Tensor, instances: Tensor) -> dict[str, Tensor]:
        """Logits: "positions" [B, K, side, side]; "mean" and "attention" [B, MAX_OBJECTS, K - 1]."""
        tokens = self.tower(pixel_values=images).last_hidden_state[:, 1:]
        side = images.shape[-1] // self.tower.config.patch_size
        grid = tokens.transpose(1, 2).reshape(len(images), -1, side, side)
        visible = (instances[:, None] == torch.arange(MAX_OBJECTS)[None, :, None, None]).float()
        cover = F.adaptive_avg_pool2d(visible, side).flatten(2)  # [B, M, N]: share of each patch
        means = cover @ tokens / cover.sum(dim=2, keepdim=True).clamp_min(1e-6)
        scores = torch.einsum("bnc,hc->bhn", self.keys(tokens), self.queries) / tokens.shape[-1] ** 0.5
        scores = scores[:, None] + cover.clamp_min(1e-6).log()[:, :, None]  # [B, M, heads, N]
        pooled = scores.softmax(dim=-1) @ tokens[:, None]  # [B, M, heads, C]
        return {"positions": self.positions(grid), "mean": self.mean(means),
                "attention": self.attention(pooled.flatten(2))}


@torch.no_grad()
def shape_accuracy(readouts: Readouts, batch: dict) -> dict[str, dict[str, float]]:
    """Per readout and size class, the share of objects whose shape it names."""
    was_training = readouts.training
    readouts.eval()
    logits = readouts(batch["images"], batch["instances"])
    painted = F.interpolate(logits["positions"], size=batch["maps"].shape[-2:], mode="bilinear").argmax(dim=1)
    right: dict[str, dict[str, list[bool]]] = {name: defaultdict(list) for name in logits}
    for row, sizes in enumerate(batch["sizes"]):
        for slot, size_class in enumerate(sizes):
            shape = int(batch["classes"][row, slot]) % len(SHAPES)
            there = painted[row][(batch["instances"][row] == slot) & (painted[row] > 0)]
            named = (int(there.mode().values) - 1) % len(SHAPES) if there.numel() else -1
            right["positions"][size_class].append(named == shape)
            for name in ("mean", "attention"):
                right[name][size_class].append(int(logits[name][row, slot].argmax()) % len(SHAPES) == shape)
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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--save", type=Path, help="also write the tower's weights here (safetensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr = args.lr or (3e-3 if args.frozen else 5e-4)

    model = build_nlvr()
    start_from_seg(model)
    readouts = Readouts(model.vision_model)
    readouts.tower.requires_grad_(not args.frozen)
    trained = [p for p in readouts.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0 if args.frozen else 0.05)
    train = NlvrDataset("train", size=args.steps * args.batch, image_size=SIZE)
    held_out = scenes(NlvrDataset("val", size=VALIDATION, image_size=SIZE), range(VALIDATION))

    curve = [{"step": 0, "shape_accuracy": shape_accuracy(readouts, held_out)}]
    losses = []
    bar = tqdm(range(args.steps), desc="frozen" if args.frozen else "trained")
    for step in bar:
        batch = scenes(train, range(step * args.batch, (step + 1) * args.batch))
        logits = readouts(batch["images"], batch["instances"])
        classes = batch["classes"].flatten()
        loss = attribute_loss(logits["positions"], batch["maps"]) + sum(
            F.cross_entropy(logits[name].flatten(0, 1), classes) for name in ("mean", "attention"))
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
    path = args.out / f"nlvr_perception-{'frozen' if args.frozen else 'trained'}.json"
    run = {"steps": args.steps, "batch": args.batch, "lr": lr, "size": SIZE, "validation_scenes": VALIDATION,
           "chance": round(1 / len(SHAPES), 3), "curve": curve}
    path.write_text(json.dumps(run, indent=1))
    print(f"wrote {path}")
    if args.save:
        weights = readouts.tower.state_dict()
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, args.save)
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()

"""Teaching a vision tower to tell shapes apart in its tokens, for training only.

BLIP's text encoder reads the image through cross-attention: a word's query picks tokens by a
linear key and takes a weighted mean of their linear values. A statement can only find "the star"
if the star's tokens, alone or pooled over the object, tell stars from squares linearly, and the
tokens of a tower trained for segmentation hardly do (`benchmarks/nlvr_perception.py`: its conv
head sees each token's neighbours, the text encoder does not). `ObjectReadouts` wraps the tower
with three readouts of each object's colour×shape class, whose losses teach the tokens to carry it:

    positions  a 1×1 head on every token (reference/recipes/auxiliary.py's attribute loss)
    mean       the tokens averaged over the object's visible part, a linear class
    attention  OBJECT_QUERIES learned queries attend over the object's tokens (by linear keys,
               weighted by how much of each patch the object covers) and a linear head reads
               their pooled tokens: how a cross-attention that has found the object reads it

and a 1×1 head on every token says where its object is: the object's centre (x, y) and whether
the centre lies in this patch. Statements count objects and compare their places; a
cross-attention over patches weighs a large object by its many patches unless one token per
object says "here is one", and it can compare places only if the tokens carry them.

A cross-attention must also find what a statement names among all the tokens, by one linear key
per head: `FindingReadouts` adds a fourth readout, one learned query per kind a statement can
name ("red circle", "circle", "red shape") attending over all the tokens with one linear key,
taught to put weight 1 on the class token (a sink) and 1 on each object of the kind, spread over
its patches (`kind_targets`), so that a head of the text encoder's cross-attention can find
them by one linear key too (`benchmarks/nlvr_grounding.py` asks how well a reader does when its
attention is set to these targets, and when it must learn them).

The readouts are dropped when the model ships; `NlvrObjects` gives the scenes they learn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve.reference.recipes.auxiliary import attribute_loss
from tokensieve.tasks.attributes import COLOUR_NAMES, SHAPES, SIZE_CLASSES
from tokensieve.tasks.nlvr import IGNORED, NlvrDataset
from tokensieve.tasks.scenes import (
    ATTRIBUTE_CLASSES,
    Rendering,
    Scene,
    attribute_class,
    attribute_map,
    render,
)

MAX_OBJECTS = 8  # object slots of a scene's table: NlvrConfig's most objects
OBJECT_QUERIES = 6
CENTRE_WEIGHT = 10.0  # of the centres' L1 error in image widths (a patch is 0.07 of the width)
# Every kind a statement can name: (colour, shape), (None, shape) or (colour, None).
KINDS: tuple[tuple[str | None, str | None], ...] = tuple(
    (colour, shape) for colour in (None, *COLOUR_NAMES) for shape in (None, *SHAPES) if colour or shape)
FINDING_WIDTH = 64  # the finding readout's key width: a head of the nlvr text encoder's cross-attention
FINDING_WEIGHT = 1.0  # of the finding readout's loss


def kind_targets(scene: Scene, rendering: Rendering, kinds: tuple[tuple[str | None, str | None], ...],
                 patch: int) -> Tensor:
    """float32 [len(kinds), 1 + side²]: where an attention over a tower's tokens (class token
    first, then the patches row by row) should look to find each kind: weight 1 on the class
    token and 1 on each visible object of the kind, spread over its patches by the share of its
    visible part each holds; normalised, so the class token's share, 1/(n + 1), counts them."""
    masks = torch.from_numpy(rendering.masks).float()
    side = masks.shape[-1] // patch
    coverage = F.avg_pool2d(masks[:, None], patch).flatten(1)  # [objects, side²]
    coverage = coverage / coverage.sum(dim=1, keepdim=True).clamp_min(1e-12)  # hidden objects: 0
    targets = torch.zeros(len(kinds), 1 + side * side)
    targets[:, 0] = 1.0
    for row, kind in enumerate(kinds):
        for index in scene.indices(*kind):
            targets[row, 1:] += coverage[index]
    return targets / targets.sum(dim=1, keepdim=True)


class NlvrObjects(NlvrDataset):
    """nlvr's scenes for perception: {"image": float32 [3, H, W], "attributes": uint8 [H, W]
    (`scenes.attribute_map`), "instances": int64 [H, W] (the object visible at each pixel, -1 for
    background), "finding": float32 [len(KINDS), 1 + side²] (`kind_targets` for `patch`-pixel
    patches), and per object slot (MAX_OBJECTS of them): "classes": int64 (the colour×shape
    class less one, as the object readouts have no background class; IGNORED when empty),
    "sizes": int64 (index into `attributes.SIZE_CLASSES`, -1), "centres": float32 [2] (x, y in
    image widths, NaN) and "centre_pixels": int64 [2] (the pixel holding the centre, -1)}."""

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 patch: int = 16) -> None:
        super().__init__(split, size, image_size)
        self.patch = patch

    def sample(self, index: int) -> dict:
        scene, _ = self.scene(index)
        if len(scene.objects) > MAX_OBJECTS:
            raise ValueError(f"scene {index} has {len(scene.objects)} objects; the readouts hold "
                             f"{MAX_OBJECTS}")
        rendering = render(scene)
        classes = torch.full((MAX_OBJECTS,), IGNORED, dtype=torch.long)
        sizes = torch.full((MAX_OBJECTS,), -1, dtype=torch.long)
        centres = torch.full((MAX_OBJECTS, 2), float("nan"))
        centre_pixels = torch.full((MAX_OBJECTS, 2), -1, dtype=torch.long)
        for slot, obj in enumerate(scene.objects):
            classes[slot] = attribute_class(obj) - 1
            sizes[slot] = list(SIZE_CLASSES).index(obj.size_class)
            centres[slot] = torch.tensor(obj.center) / self.image_size
            centre_pixels[slot] = torch.tensor([int(value) for value in obj.center])
        return {"image": torch.from_numpy(rendering.image),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)),
                "instances": torch.from_numpy(rendering.instances.astype("int64")),
                "finding": kind_targets(scene, rendering, KINDS, self.patch),
                "classes": classes, "sizes": sizes, "centres": centres, "centre_pixels": centre_pixels}


@dataclass
class ReadoutLogits:
    positions: Tensor  # [B, ATTRIBUTE_CLASSES, side, side]
    mean: Tensor  # [B, MAX_OBJECTS, ATTRIBUTE_CLASSES - 1]
    attention: Tensor  # [B, MAX_OBJECTS, ATTRIBUTE_CLASSES - 1]
    where: Tensor  # [B, 3, side, side]: the object's centre (x, y) and the centre flag's logit
    finding: Tensor | None = None  # [B, len(KINDS), 1 + side²]: FindingReadouts' log-attention


class ObjectReadouts(nn.Module):
    """A ViT tower (transformers BLIP or CLIP vision model) and its three object readouts."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        width = tower.config.hidden_size
        self.tower = tower
        self.positions = nn.Conv2d(width, ATTRIBUTE_CLASSES, kernel_size=1)
        self.mean = nn.Linear(width, ATTRIBUTE_CLASSES - 1)
        self.keys = nn.Linear(width, width)
        self.queries = nn.Parameter(torch.randn(OBJECT_QUERIES, width) / width**0.5)
        self.attention = nn.Linear(OBJECT_QUERIES * width, ATTRIBUTE_CLASSES - 1)
        self.where = nn.Conv2d(width, 3, kernel_size=1)

    def forward(self, pixel_values: Tensor, instances: Tensor) -> ReadoutLogits:
        """`pixel_values` [B, 3, H, W] at the tower's native size; `instances` [B, H, W] as
        NlvrObjects gives them."""
        return self.read(self.tower(pixel_values=pixel_values).last_hidden_state, instances)

    def read(self, hidden: Tensor, instances: Tensor) -> ReadoutLogits:
        """The readouts of the tower's output `hidden` [B, 1 + side², C] (class token first)."""
        tokens = hidden[:, 1:]
        side = round(tokens.shape[1] ** 0.5)
        grid = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
        slots = torch.arange(MAX_OBJECTS, device=instances.device)
        visible = (instances[:, None] == slots[None, :, None, None]).float()
        cover = F.adaptive_avg_pool2d(visible, side).flatten(2)  # [B, M, N]: share of each patch
        means = cover @ tokens / cover.sum(dim=2, keepdim=True).clamp_min(1e-6)
        scores = torch.einsum("bnc,hc->bhn", self.keys(tokens), self.queries) / tokens.shape[-1] ** 0.5
        scores = scores[:, None] + cover.clamp_min(1e-6).log()[:, :, None]  # [B, M, queries, N]
        pooled = scores.softmax(dim=-1) @ tokens[:, None]  # [B, M, queries, C]
        return ReadoutLogits(positions=self.positions(grid), mean=self.mean(means),
                             attention=self.attention(pooled.flatten(2)), where=self.where(grid))


class FindingReadouts(ObjectReadouts):
    """ObjectReadouts and the finding readout: a learned query per kind of `KINDS` attending over
    all the tower's tokens by one linear key, as a head of a text encoder's cross-attention does."""

    def __init__(self, tower: nn.Module, key_width: int = FINDING_WIDTH) -> None:
        super().__init__(tower)
        self.finding_keys = nn.Linear(tower.config.hidden_size, key_width)
        self.finding_queries = nn.Parameter(torch.randn(len(KINDS), key_width) / key_width**0.5)

    def forward(self, pixel_values: Tensor, instances: Tensor) -> ReadoutLogits:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        logits = self.read(hidden, instances)
        scores = torch.einsum("bnc,kc->bkn", self.finding_keys(hidden), self.finding_queries)
        logits.finding = (scores / self.finding_keys.out_features**0.5).log_softmax(dim=-1)
        return logits


def readout_loss(logits: ReadoutLogits, targets: dict) -> Tensor:
    """The readouts' losses, summed: the cross-entropies of positions against
    targets["attributes"] [B, H, W] and of the object readouts against targets["classes"]
    [B, MAX_OBJECTS]; the centres' L1 error (in image widths, × CENTRE_WEIGHT) on patches with an
    object, and the centre flags' binary cross-entropy."""
    centre_error, flag_loss = where_losses(logits.where, targets)
    loss = class_loss(logits, targets) + CENTRE_WEIGHT * centre_error + flag_loss
    if logits.finding is not None:  # FindingReadouts: the cross-entropy against targets["finding"]
        loss = loss + FINDING_WEIGHT * -(targets["finding"] * logits.finding).sum(dim=-1).mean()
    return loss


def class_loss(logits: ReadoutLogits, targets: dict) -> Tensor:
    """The cross-entropies of the positions against targets["attributes"] [B, H, W] and of the
    object readouts against targets["classes"] [B, MAX_OBJECTS], summed."""
    classes = targets["classes"].flatten()
    return (attribute_loss(logits.positions, targets["attributes"])
            + F.cross_entropy(logits.mean.flatten(0, 1), classes, ignore_index=IGNORED)
            + F.cross_entropy(logits.attention.flatten(0, 1), classes, ignore_index=IGNORED))


def where_losses(where: Tensor, targets: dict) -> tuple[Tensor, Tensor]:
    """The L1 error of the centres (in image widths) on patches with an object, and the centre
    flags' binary cross-entropy; `where` [B, 3, side, side]."""
    centres, flags = where_targets(targets, where.shape[-1])
    on_object = ~centres.isnan()
    return (F.l1_loss(where[:, :2][on_object], centres[on_object]),
            F.binary_cross_entropy_with_logits(where[:, 2], flags))


def where_targets(targets: dict, side: int) -> tuple[Tensor, Tensor]:
    """Per patch of a side × side grid: the centre [B, 2, side, side] of the object visible at the
    patch's middle pixel (NaN on background), and [B, side, side] 1 where an object's centre lies."""
    instances, centres = targets["instances"], targets["centres"]
    batch, patch = len(instances), instances.shape[-1] // side
    middles = instances[:, patch // 2 :: patch, patch // 2 :: patch][:, :side, :side]
    with_background = torch.cat([centres.new_full((batch, 1, 2), float("nan")), centres], dim=1)
    rows = torch.arange(batch, device=instances.device)[:, None, None]
    patch_centres = with_background[rows, middles + 1].permute(0, 3, 1, 2)
    flags = centres.new_zeros(batch, side, side)
    placed = targets["centre_pixels"][:, :, 0] >= 0
    cells = (targets["centre_pixels"] // patch).clamp_max(side - 1)
    flags[rows[:, :, 0].expand_as(placed)[placed], cells[..., 1][placed], cells[..., 0][placed]] = 1.0
    return patch_centres, flags


def readouts_collate(samples: list[dict]) -> tuple[dict, dict]:
    """NlvrObjects samples → (ObjectReadouts' keyword inputs, readout_loss's targets)."""
    inputs = {"pixel_values": torch.stack([s["image"] for s in samples]),
              "instances": torch.stack([s["instances"] for s in samples])}
    keys = ("attributes", "instances", "classes", "sizes", "centres", "centre_pixels", "finding")
    targets = {key: torch.stack([s[key] for s in samples]) for key in keys}
    return inputs, targets



@torch.no_grad()
def readout_accuracy(readouts: ObjectReadouts, samples: list[dict]) -> dict[str, float]:
    """Of the objects in NlvrObjects `samples`: the share whose colour×shape class and whose shape
    the attention readout names, and whose centre patch the centre flag finds (among as many
    flagged patches as the scenes have objects); the centres' mean error in image widths; with
    FindingReadouts, the finding readout's mean attention on the tokens its targets weigh."""
    inputs, targets = readouts_collate(samples)
    logits = readouts(**inputs)
    there = targets["classes"] != IGNORED
    named, truth = logits.attention.argmax(dim=-1)[there], targets["classes"][there]
    centres, flags = where_targets(targets, logits.where.shape[-1])
    flagged = logits.where[:, 2].flatten().topk(int(flags.sum())).indices
    on_object = ~centres.isnan()
    scores = {"objects_named": (named == truth).float().mean().item(),
              "shapes_named": (named % len(SHAPES) == truth % len(SHAPES)).float().mean().item(),
              "centres_found": flags.flatten()[flagged].mean().item(),
              "centre_error": (logits.where[:, :2][on_object] - centres[on_object]).abs().mean().item()}
    if logits.finding is not None:  # the finding readout's attention on the tokens it should find
        scores["kinds_found"] = (logits.finding.exp() * (targets["finding"] > 0)).sum(-1).mean().item()
    return scores

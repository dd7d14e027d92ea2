"""Dense colour×shape supervision of a reference model's image encoder, for training only.

Sentence-level losses (a tos mask, an nlvr yes/no) say little about each image position, and a
small encoder trained on them alone loses what the sentences name: the tos model learned to
outline likely objects whatever the sentence said, and the nlvr tower's tokens collapsed to one
vector (docs/reference.md). `AttributeHead`
wraps a model for its recipe: a linear head reads every position of the image encoder's output
map, and `with_attributes` adds the cross-entropy of its colour×shape classes
(`tasks.scenes.attribute_map`) to the task loss. The head is dropped when the recipe ships the
model (`AttributeHead.model`).

    tos        the SAM neck's map [B, 128, h, w]
    nlvr       BLIP's vision tower, its patch tokens [B, N, 192] laid out on their grid
    retrieval  CLIP's vision tower, the same
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tokensieve.reference.tos import TosModel
from tokensieve.tasks.scenes import ATTRIBUTE_CLASSES

ATTRIBUTE_WEIGHT = 1.0  # of the attribute loss, against the task loss's 1
BLOCK = 4  # the logits are read at 1/4 of the image size, SAM's mask resolution


@dataclass
class AuxiliaryOutput:
    output: Any  # the wrapped model's own output
    attribute_logits: Tensor  # [B, ATTRIBUTE_CLASSES, h, w], one per encoder position


class AttributeHead(nn.Module):
    """`model` plus a linear colour×shape head on its image encoder's output map; the forward
    takes the model's own arguments and returns an AuxiliaryOutput."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        site, self._to_map, width = _encoder_site(model)
        self.head = nn.Conv2d(width, ATTRIBUTE_CLASSES, kernel_size=1)
        self._map: Tensor | None = None
        site.register_forward_hook(self._keep_map)

    def _keep_map(self, module: nn.Module, args: Any, output: Any) -> None:
        self._map = self._to_map(output)

    def forward(self, *args: Any, **kwargs: Any) -> AuxiliaryOutput:
        self._map = None
        output = self.model(*args, **kwargs)
        if self._map is None:
            raise RuntimeError("the image encoder did not run in the model's forward")
        feature_map, self._map = self._map, None
        return AuxiliaryOutput(output=output, attribute_logits=self.head(feature_map))


def with_attributes(task_loss: Callable[[Tensor, Any], Tensor],
                    logits_of: Callable[[Any], Tensor]) -> Callable[[AuxiliaryOutput, dict], Tensor]:
    """The loss of a model wrapped in AttributeHead: `task_loss(logits_of(output), targets["task"])`
    + ATTRIBUTE_WEIGHT · `attribute_loss(attribute logits, targets["attributes"])`."""

    def loss(output: AuxiliaryOutput, targets: dict) -> Tensor:
        task = task_loss(logits_of(output.output), targets["task"])
        return task + ATTRIBUTE_WEIGHT * attribute_loss(output.attribute_logits, targets["attributes"])

    return loss


def attribute_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of attribute logits [B, K, h, w], upsampled to a quarter of the labels' size,
    against the labels [B, H, W] read at the centre of each 4×4 pixel block, so objects smaller
    than a patch count."""
    height, width = labels.shape[-2:]
    if height % BLOCK or width % BLOCK:
        raise ValueError(f"attribute labels of {height}×{width} pixels do not split into {BLOCK}×{BLOCK} "
                         "blocks; give the image's full-size label map")
    size = (height // BLOCK, width // BLOCK)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    centre = BLOCK // 2
    return F.cross_entropy(logits, labels[:, centre::BLOCK, centre::BLOCK].long())


def _encoder_site(model: nn.Module) -> tuple[nn.Module, Callable[[Any], Tensor], int]:
    """The module whose output is the image encoder's map, how to lay it out [B, C, h, w], and C."""
    if isinstance(model, TosModel):
        neck = model.sam.vision_encoder.neck  # runs at every image size (encode_resized too)
        return neck, lambda output: output, model.prompt_width
    if isinstance(model, (transformers.BlipForImageTextRetrieval, transformers.CLIPModel)):
        tower = model.vision_model
        return tower, _patch_grid, tower.config.hidden_size
    raise TypeError(f"no attribute head for {type(model).__name__}; it wraps the tos (TosModel), nlvr "
                    "(BlipForImageTextRetrieval) and retrieval (CLIPModel) reference models")


def _patch_grid(output: Any) -> Tensor:
    """A ViT tower's patch tokens (after its class token) as a map [B, C, g, g]."""
    tokens = output.last_hidden_state[:, 1:]
    batch, count, width = tokens.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} patch tokens do not make a square grid")
    return tokens.transpose(1, 2).reshape(batch, width, side, side)

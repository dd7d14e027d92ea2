"""The reference task models: transformers ViTs the size of DeiT-Tiny, trained on the synthetic
tasks (tokensieve.tasks; seg from scratch, cls from the seg backbone), so that every method runs
on a real host's code paths.

Both take images as the tasks make them: float32 [B, 3, H, W] in [0, 1], unnormalised (a model
trained from scratch learns the affine map into its patch embedding). H = W = 224 is the native
size; other multiples of 16 interpolate the position embeddings. The tos model (a small SAM
prompted by text, native size 256×256) lives in tos.py, the nlvr and retrieval models (small
BLIP and CLIP) in vl.py.
"""

from __future__ import annotations

import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tokensieve.reference.tos import TOS_IMAGE_SIZE
from tokensieve.tasks import CLS_CLASSES, SEG_CLASSES

IMAGE_SIZE = 224
# each model's native input side (nlvr and retrieval: the BLIP and CLIP models of vl.py)
IMAGE_SIZES = {"cls": IMAGE_SIZE, "seg": IMAGE_SIZE, "tos": TOS_IMAGE_SIZE, "nlvr": IMAGE_SIZE,
               "retrieval": IMAGE_SIZE, "det": IMAGE_SIZE}
PATCH_SIZE = 16
# DeiT-Tiny: width 192, 12 layers, 3 heads, MLP ratio 4.
TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def tiny_vit_config(labels: list[str] | tuple[str, ...] = ()) -> transformers.ViTConfig:
    config = transformers.ViTConfig(**TINY, num_labels=max(len(labels), 1))
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    return config


def build_classifier() -> transformers.ViTForImageClassification:
    """The cls model: a plain `ViTForImageClassification` (CLS token → linear head), 8 classes."""
    return transformers.ViTForImageClassification(tiny_vit_config(CLS_CLASSES))


class SegmentationViT(nn.Module):
    """The seg model: a `ViTModel` backbone and a light progressive-upsampling head.

    The head reads the final patch tokens as a grid (h = H/16), and refines it twice by a 3×3
    convolution and ×2 upsampling: logits [B, classes, 4h, 4h], a quarter of the input's side
    (`pixel_cross_entropy` and `predict` upsample them to the labels). Patch the backbone with
    `dense=True` so pruned tokens come back in place and the head sees the whole grid:
    `ts.patch(model.backbone, method, dense=True)`.
    """

    def __init__(self, backbone: transformers.ViTModel, classes: int = len(SEG_CLASSES),
                 widths: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_size
        self.head = nn.Sequential(
            _refine(width, widths[0]),
            _refine(widths[0], widths[1]),
            nn.Conv2d(widths[1], classes, kernel_size=1),
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        side = pixel_values.shape[-1] // PATCH_SIZE
        interpolate = pixel_values.shape[-1] != self.backbone.config.image_size
        output = self.backbone(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        tokens = output.last_hidden_state
        patches = tokens[:, -side * side :]  # the grid follows the class token
        grid = patches.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return self.head(grid)

    def predict(self, pixel_values: Tensor) -> Tensor:
        """Class map [B, H, W] at the input's resolution."""
        logits = self(pixel_values)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)


def _refine(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel_size=3, padding=1),
        nn.GroupNorm(8, outputs),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )


def build_segmenter() -> SegmentationViT:
    return SegmentationViT(transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False))

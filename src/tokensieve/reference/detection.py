"""The det reference model's architecture: torchvision's Mask R-CNN on a transformers `ViTModel`
of the reference size, through a ViTDet-style simple feature pyramid, trained by RECIPES["det"]
from the seg backbone.

The pyramid reads only the ViT's last token map (the patch tokens as a [B, C, H/p, W/p] grid, the
class token dropped) and resamples it to strides p/4, p/2, p and 2p (transposed convolutions up,
max-pooling down), each level then mapped to a common width by a 1×1 and a 3×3 convolution with a
channel LayerNorm after each. Patch the ViT with `dense=True` so the grid is always whole:
`ts.patch(detector.backbone.vit, method, dense=True)`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from tokensieve.layer_norm import LayerNorm2d
from tokensieve.reference.models import IMAGE_SIZE, tiny_vit_config
from tokensieve.tasks.det import DET_CLASSES

PYRAMID_WIDTH = 128  # every pyramid level's channels: small enough for CPU training
# the box head's MLP (torchvision's default is 1024, for 80 classes): 128 keeps the shipped fp16
# weights under 16 MB
BOX_HEAD_WIDTH = 128
# Each level's stride as a multiple of the patch size (p/4, p/2, p, 2p): strides 4, 8, 16, 32 at p = 16.
LEVEL_SCALES = (0.25, 0.5, 1.0, 2.0)
LEVELS = tuple(str(i) for i in range(len(LEVEL_SCALES)))  # the pyramid's map names, as torchvision's FPN
POOL_LEVEL = "pool"  # one more level at twice the coarsest stride, for the largest anchors only
# Anchor sides per level as a share of the image side. The det scenes' objects cover 0.8% to 7% of
# the image (tasks/attributes.py SIZE_CLASSES): boxes of about 20 to 90 px at 224 px, smaller where
# occluded; these give 16, 32, 64, 96 and 128 px at 224 px.
ANCHOR_SHARES = (1 / 14, 1 / 7, 2 / 7, 3 / 7, 4 / 7)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


class SimplePyramidBackbone(nn.Module):
    """A `ViTModel` and the simple feature pyramid over its last token map: an OrderedDict of
    maps "0".."3" (strides p/4, p/2, p, 2p) and "pool" (4p), each `out_channels` wide, as
    torchvision's detectors take from a backbone."""

    def __init__(self, vit: transformers.ViTModel, out_channels: int = PYRAMID_WIDTH) -> None:
        super().__init__()
        self.vit = vit
        self.out_channels = out_channels
        self.patch_size = vit.config.patch_size
        width = vit.config.hidden_size
        self.resamplers = nn.ModuleList(_resampler(scale, width) for scale in LEVEL_SCALES)
        self.necks = nn.ModuleList(_neck(_resampled_width(scale, width), out_channels)
                                   for scale in LEVEL_SCALES)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        grid = self.token_map(images)
        maps = OrderedDict((name, neck(resample(grid))) for name, resample, neck
                           in zip(LEVELS, self.resamplers, self.necks, strict=True))
        maps[POOL_LEVEL] = F.max_pool2d(maps[LEVELS[-1]], kernel_size=1, stride=2)
        return maps

    def token_map(self, images: Tensor) -> Tensor:
        """The ViT's last patch tokens as a grid [B, C, H/p, W/p]."""
        rows, cols = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        interpolate = tuple(images.shape[-2:]) != (self.vit.config.image_size,) * 2
        tokens = self.vit(pixel_values=images, interpolate_pos_encoding=interpolate).last_hidden_state
        if tokens.shape[1] != 1 + rows * cols:  # the class token, then the grid
            raise ValueError(f"the ViT returned {tokens.shape[1]} tokens for a {rows}x{cols} grid and its "
                             "class token; the pyramid reads every position, so patch the ViT with "
                             "dense=True: ts.patch(detector.backbone.vit, method, dense=True)")
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)


def _resampled_width(scale: float, width: int) -> int:
    """Channels after resampling: each ×2 transposed convolution halves them, as in ViTDet."""
    return int(width * scale) if scale < 1 else width


def _resampler(scale: float, width: int) -> nn.Module:
    if scale == 0.25:
        return nn.Sequential(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2),
                             LayerNorm2d(width // 2), nn.GELU(),
                             nn.ConvTranspose2d(width // 2, width // 4, kernel_size=2, stride=2))
    if scale == 0.5:
        return nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 2.0:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"no resampler for scale {scale}; use one of 0.25, 0.5, 1.0, 2.0")


def _neck(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel_size=1, bias=False), LayerNorm2d(outputs),
                         nn.Conv2d(outputs, outputs, kernel_size=3, padding=1, bias=False),
                         LayerNorm2d(outputs))


def build_detector(config: transformers.ViTConfig | None = None, image_size: int = IMAGE_SIZE,
                   out_channels: int = PYRAMID_WIDTH) -> MaskRCNN:
    """The det model with random weights: Mask R-CNN (7 classes, background included) on a
    `ViTModel` of `config` (default: the reference size). Images of `image_size` go in as the
    task makes them, [3, H, W] in [0, 1], neither resized nor normalised (as the seg model takes
    them, so the seg backbone's weights fit)."""
    config = config or tiny_vit_config()
    vit = transformers.ViTModel(config, add_pooling_layer=False)
    backbone = SimplePyramidBackbone(vit, out_channels)
    anchors = AnchorGenerator(sizes=tuple((max(round(share * image_size), 1),) for share in ANCHOR_SHARES),
                              aspect_ratios=(ASPECT_RATIOS,) * len(ANCHOR_SHARES))
    classes = len(DET_CLASSES)
    box_pool = MultiScaleRoIAlign(featmap_names=list(LEVELS), output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=list(LEVELS), output_size=14, sampling_ratio=2)
    return MaskRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        # the batch is padded to a multiple of the coarsest stride, so every level's grid is whole
        size_divisible=int(config.patch_size * max(LEVEL_SCALES)),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000, rpn_pre_nms_top_n_test=500,  # at most 8 objects per image
        rpn_post_nms_top_n_train=500, rpn_post_nms_top_n_test=300,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(out_channels * 7 * 7, BOX_HEAD_WIDTH),
        box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, classes),
        box_batch_size_per_image=256,
        mask_roi_pool=mask_pool,
        mask_head=MaskRCNNHeads(out_channels, [out_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(out_channels, out_channels, classes),
    )


def is_detector(model: nn.Module) -> bool:
    """Whether `model` is a det model: a Mask R-CNN on the simple pyramid over a ViT."""
    return isinstance(model, MaskRCNN) and isinstance(model.backbone, SimplePyramidBackbone)


def detector_from_seg(source: transformers.ViTModel | None = None, image_size: int = IMAGE_SIZE) -> MaskRCNN:
    """The det model with its ViT started from the seg backbone (default: the shipped one) and the
    rest random: the starting point of a det recipe."""
    if source is None:
        from tokensieve.reference.store import load_reference  # the store imports the model builders

        source = load_reference("seg").backbone
    detector = build_detector(copy.deepcopy(source.config), image_size)
    with torch.no_grad():
        detector.backbone.vit.load_state_dict(source.state_dict())
    return detector

"""Patching a reference model with a pruning method: which of its modules the method prunes."""

from __future__ import annotations

import dataclasses

from torch import nn

import tokensieve as ts
from tokensieve.methods import MADTP, VLTP, Method
from tokensieve.patch import Sieve
from tokensieve.reference.detection import is_detector
from tokensieve.reference.models import SegmentationViT
from tokensieve.reference.tos import TosModel
from tokensieve.reference.vl import is_vl_model


def patch_reference(model: nn.Module, method: Method) -> Sieve:
    """Patch a reference model with `method`: the classifier whole; the seg model's backbone, the
    det model's ViT and the tos model's SAM vision encoder in dense mode (pruned tokens stay in
    place, so the head, the feature pyramid, the neck and the mask decoder see every position);
    the vision tower of the nlvr (BLIP) and retrieval (CLIP) models as it is (BLIP's text encoder
    cross-attends to the kept image tokens, CLIP pools the class token). Their text encoders are
    patched on their own: `ts.patch(text_encoder(model), method)`; MADTP, which prunes both towers
    with one bank, is patched on both together. VLTP on the tos model reads
    the model's own guidance, so a VLTP without `guidance_width` gets the model's prompt width."""
    if isinstance(model, TosModel) and isinstance(method, VLTP) and method.guidance_width is None:
        method = dataclasses.replace(method, guidance_width=model.pruning_width)  # what the model gives it
    if isinstance(model, (SegmentationViT, TosModel)) or is_detector(model):
        return ts.patch(image_encoder(model), method, dense=True)
    if is_vl_model(model):
        if isinstance(method, MADTP):
            return ts.patch([image_encoder(model), text_encoder(model)], method)
        return ts.patch(image_encoder(model), method)
    return ts.patch(model, method)


def image_encoder(model: nn.Module) -> nn.Module:
    """The module a reference model's pruning patches, and whose MACs are reported."""
    if isinstance(model, SegmentationViT):
        return model.backbone
    if is_detector(model):
        return model.backbone.vit
    if isinstance(model, TosModel):
        return model.sam.vision_encoder
    if is_vl_model(model):
        return model.vision_model
    return model


def text_encoder(model: nn.Module) -> nn.Module:
    """The text tower of a vision-language reference model: BLIP's `text_encoder` (nlvr), CLIP's
    `text_model` (retrieval)."""
    if not is_vl_model(model):
        raise TypeError(f"{type(model).__name__} has no text encoder tokensieve patches; the nlvr (BLIP) "
                        "and retrieval (CLIP) reference models have one")
    return model.text_encoder if hasattr(model, "text_encoder") else model.text_model

"""Start the image encoders of the cls, tos, nlvr and retrieval models from the shipped seg backbone.

BLIP, CLIP, SAM and LISA always start from a pretrained ViT; ours start from the seg reference
model's ViT (trained on our own seg data, where every pixel says which shape it belongs to). The
other recipes then learn to name objects, or to ground a sentence in them, with an encoder that
already tells shapes apart, instead of learning to see from one label per image.

The weights map one to one (patch embedding, class token, positions, each block's attention,
norms and MLP, the final norm; the first blocks when the target is shallower), with these
differences handled here:
- BLIP and SAM fuse q, k and v into one projection (concatenated in that order, as they split it);
- CLIP's patch embedding has no bias, so the seg bias moves into the position embeddings of the
  patch positions, where it adds the same vector to every patch token; CLIP's extra norm before
  the blocks starts as it is;
- SAM has no class token, keeps its absolute positions as a [1, rows, cols, C] map (resampled
  here from the seg grid), and starts its relative-position tables and its neck as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tokensieve.reference.detection import is_detector
from tokensieve.reference.tos import TosModel
from tokensieve.reference.vl import is_vl_model

# Where each block's tensors go: the seg ViT's names (left; "qkv" is its q, k and v concatenated)
# and the target's (right).
_VIT_BLOCK = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
              "layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2")
_NORMS_AND_MLP = {"layernorm_before": "layer_norm1", "layernorm_after": "layer_norm2",
                  "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLIP_BLOCK = {"qkv": "self_attn.qkv", "attention.o_proj": "self_attn.projection", **_NORMS_AND_MLP}
_CLIP_BLOCK = {"attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
               "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.out_proj",
               **_NORMS_AND_MLP}
_SAM_BLOCK = {"qkv": "attn.qkv", "attention.o_proj": "attn.proj", **_NORMS_AND_MLP,
              "mlp.fc1": "mlp.lin1", "mlp.fc2": "mlp.lin2"}


def vision_weights_from_vit(source: transformers.ViTModel, target: nn.Module) -> dict[str, Tensor]:
    """The state dict of `target` (a BlipVisionModel or CLIPVisionModel) built from the first
    blocks of `source`, every tensor of `target` covered, shapes checked."""
    src = _source_tensors(source, target)
    cls_token = src["embeddings.cls_token"]
    positions = src["embeddings.position_embeddings"]
    patch_weight = src["embeddings.patch_embeddings.projection.weight"]
    patch_bias = src["embeddings.patch_embeddings.projection.bias"]
    if isinstance(target, transformers.CLIPVisionModel):
        moved = positions[0].clone()
        moved[1:] += patch_bias  # CLIP's patch embedding has no bias of its own
        out = {"embeddings.class_embedding": cls_token.flatten(),
               "embeddings.patch_embedding.weight": patch_weight,
               "embeddings.position_embedding.weight": moved}
        block = _CLIP_BLOCK
    else:
        out = {"embeddings.class_embedding": cls_token, "embeddings.position_embedding": positions,
               "embeddings.patch_embedding.weight": patch_weight,
               "embeddings.patch_embedding.bias": patch_bias}
        block = _BLIP_BLOCK
    out |= _blocks(src, target.config.num_hidden_layers, "encoder.layers", block)
    out |= {f"post_layernorm.{part}": src[f"layernorm.{part}"] for part in ("weight", "bias")}
    return _complete(out, target.state_dict())


def sam_encoder_weights_from_vit(source: transformers.ViTModel, target: nn.Module) -> dict[str, Tensor]:
    """The state dict of `target` (a SamVisionEncoder) built from the first blocks of `source`."""
    src = _source_tensors(source, target)
    own = target.state_dict()
    positions = src["embeddings.position_embeddings"][0, 1:]  # the patch grid, without the class token
    side = int(positions.shape[0] ** 0.5)
    rows, cols = own["pos_embed"].shape[1:3]
    grid = positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    out = {"pos_embed": grid.permute(0, 2, 3, 1),
           "patch_embed.projection.weight": src["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.projection.bias": src["embeddings.patch_embeddings.projection.bias"]}
    out |= _blocks(src, target.config.num_hidden_layers, "layers", _SAM_BLOCK)
    return _complete(out, own)


def _source_tensors(source: transformers.ViTModel, target: nn.Module) -> dict[str, Tensor]:
    depth = source.config.num_hidden_layers
    if target.config.num_hidden_layers > depth:
        raise ValueError(f"the target has {target.config.num_hidden_layers} blocks, the source only {depth}")
    return {name: tensor.detach().float() for name, tensor in source.state_dict().items()}


def _blocks(src: dict[str, Tensor], layers: int, prefix: str, names: dict[str, str]) -> dict[str, Tensor]:
    """The first `layers` blocks of the seg ViT under the target's `names` (see _BLIP_BLOCK)."""
    out = {}
    for i in range(layers):
        for part in ("weight", "bias"):
            block = {name: src[f"layers.{i}.{name}.{part}"] for name in _VIT_BLOCK}
            block["qkv"] = torch.cat([block[f"attention.{p}_proj"] for p in "qkv"])
            out |= {f"{prefix}.{i}.{mine}.{part}": block[theirs] for theirs, mine in names.items()}
    return out


def _complete(out: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """`out` checked against the target's own state dict, and completed by it where `out` is silent."""
    for name, tensor in own.items():
        if name not in out:
            out[name] = tensor
        elif out[name].shape != tensor.shape:
            raise ValueError(f"{name}: the source gives {tuple(out[name].shape)}, the target has "
                             f"{tuple(tensor.shape)}")
    unknown = set(out) - set(own)
    if unknown:
        raise ValueError(f"no such tensors in the target: {sorted(unknown)}")
    return out


def start_from_seg(model: nn.Module, source: transformers.ViTModel | None = None) -> nn.Module:
    """Load the seg backbone (default: the shipped one) into `model`'s image encoder: the
    classifier's ViT, the det model's ViT, the tos model's SAM vision encoder, or the BLIP/CLIP
    vision tower."""
    if source is None:
        from tokensieve.reference.store import load_reference  # the store imports the model builders

        source = load_reference("seg").backbone
    if isinstance(model, transformers.ViTForImageClassification) or is_detector(model):
        vit = model.vit if isinstance(model, transformers.ViTForImageClassification) else model.backbone.vit
        vit.load_state_dict(_complete(dict(source.state_dict()), vit.state_dict()))
    elif isinstance(model, TosModel):
        encoder = model.sam.vision_encoder
        encoder.load_state_dict(sam_encoder_weights_from_vit(source, encoder))
    elif is_vl_model(model):
        tower = model.vision_model
        tower.load_state_dict(vision_weights_from_vit(source, tower))
    else:
        raise TypeError(f"start_from_seg loads a ViTForImageClassification, a det model, a TosModel, a "
                        f"BlipForImageTextRetrieval or a CLIPModel, not a {type(model).__name__}")
    return model

"""Start the image encoders of the cls, tos, nlvr and retrieval models from the shipped seg backbone.

BLIP, CLIP, SAM and LISA always start from a pretrained ViT; ours start from the seg reference
model's ViT (trained on our own seg data, where every pixel says which shape and colour it
belongs to). The other recipes then learn to count, or to ground a sentence in objects the
encoder can already tell apart, instead of learning to see from one label per image.

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


def vision_weights_from_vit(source: transformers.ViTModel, target: nn.Module) -> dict[str, Tensor]:
    """The state dict of `target` (a BlipVisionModel or CLIPVisionModel) built from the first
    blocks of `source`, every tensor of `target` covered, shapes checked."""
    src = {name: tensor.detach().float() for name, tensor in source.state_dict().items()}
    layers = target.config.num_hidden_layers
    if layers > source.config.num_hidden_layers:
        raise ValueError(f"the target has {layers} blocks, the source only {source.config.num_hidden_layers}")
    cls_token = src["embeddings.cls_token"]
    positions = src["embeddings.position_embeddings"]
    patch_weight = src["embeddings.patch_embeddings.projection.weight"]
    patch_bias = src["embeddings.patch_embeddings.projection.bias"]
    clip = isinstance(target, transformers.CLIPVisionModel)
    if clip:
        moved = positions[0].clone()
        moved[1:] += patch_bias  # CLIP's patch embedding has no bias of its own
        out = {"embeddings.class_embedding": cls_token.flatten(),
               "embeddings.patch_embedding.weight": patch_weight,
               "embeddings.position_embedding.weight": moved}
    else:
        out = {"embeddings.class_embedding": cls_token, "embeddings.position_embedding": positions,
               "embeddings.patch_embedding.weight": patch_weight,
               "embeddings.patch_embedding.bias": patch_bias}
    for i in range(layers):
        s, t = f"layers.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v, o = (src[f"{s}attention.{p}_proj.{part}"] for p in "qkvo")
            if clip:
                out.update({f"{t}self_attn.q_proj.{part}": q, f"{t}self_attn.k_proj.{part}": k,
                            f"{t}self_attn.v_proj.{part}": v, f"{t}self_attn.out_proj.{part}": o})
            else:
                out[f"{t}self_attn.qkv.{part}"] = torch.cat([q, k, v])
                out[f"{t}self_attn.projection.{part}"] = o
            out[f"{t}layer_norm1.{part}"] = src[f"{s}layernorm_before.{part}"]
            out[f"{t}layer_norm2.{part}"] = src[f"{s}layernorm_after.{part}"]
            out[f"{t}mlp.fc1.{part}"] = src[f"{s}mlp.fc1.{part}"]
            out[f"{t}mlp.fc2.{part}"] = src[f"{s}mlp.fc2.{part}"]
            out[f"post_layernorm.{part}"] = src[f"layernorm.{part}"]
    return _complete(out, target.state_dict())


def sam_encoder_weights_from_vit(source: transformers.ViTModel, target: nn.Module) -> dict[str, Tensor]:
    """The state dict of `target` (a SamVisionEncoder) built from the first blocks of `source`."""
    src = {name: tensor.detach().float() for name, tensor in source.state_dict().items()}
    own = target.state_dict()
    layers = target.config.num_hidden_layers
    if layers > source.config.num_hidden_layers:
        raise ValueError(f"the target has {layers} blocks, the source only {source.config.num_hidden_layers}")
    positions = src["embeddings.position_embeddings"][0, 1:]  # the patch grid, without the class token
    side = int(positions.shape[0] ** 0.5)
    rows, cols = own["pos_embed"].shape[1:3]
    grid = positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    out = {"pos_embed": grid.permute(0, 2, 3, 1),
           "patch_embed.projection.weight": src["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.projection.bias": src["embeddings.patch_embeddings.projection.bias"]}
    for i in range(layers):
        s, t = f"layers.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            q, k, v, o = (src[f"{s}attention.{p}_proj.{part}"] for p in "qkvo")
            out[f"{t}attn.qkv.{part}"] = torch.cat([q, k, v])
            out[f"{t}attn.proj.{part}"] = o
            out[f"{t}layer_norm1.{part}"] = src[f"{s}layernorm_before.{part}"]
            out[f"{t}layer_norm2.{part}"] = src[f"{s}layernorm_after.{part}"]
            out[f"{t}mlp.lin1.{part}"] = src[f"{s}mlp.fc1.{part}"]
            out[f"{t}mlp.lin2.{part}"] = src[f"{s}mlp.fc2.{part}"]
    return _complete(out, own)


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
    classifier's ViT, the tos model's SAM vision encoder, or the BLIP/CLIP vision tower."""
    if source is None:
        from tokensieve.reference.store import load_reference  # the store imports the model builders

        source = load_reference("seg").backbone
    if isinstance(model, transformers.ViTForImageClassification):
        model.vit.load_state_dict(_complete(dict(source.state_dict()), model.vit.state_dict()))
    elif hasattr(model, "sam"):
        encoder = model.sam.vision_encoder
        encoder.load_state_dict(sam_encoder_weights_from_vit(source, encoder))
    else:
        tower = model.vision_model
        tower.load_state_dict(vision_weights_from_vit(source, tower))
    return model

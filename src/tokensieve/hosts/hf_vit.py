"""transformers ViT, DeiT, DINOv2 and DINOv2-with-registers: reading their layers."""

from __future__ import annotations

import math

from torch import Tensor, nn

from tokensieve import calls
from tokensieve.hosts.base import Host, linear_macs
from tokensieve.hosts.hf_attention import HFAttentionPart
from tokensieve.spec import ModelSpec

FAMILY = "transformers ViT/DeiT/Dinov2/Dinov2WithRegisters (Model and ForImageClassification)"

# Class name -> (distillation token, head averages the patch tokens)
_MODELS = {
    "ViTModel": (False, False),
    "ViTForImageClassification": (False, False),
    "DeiTModel": (True, False),
    "DeiTForImageClassification": (True, False),
    "DeiTForImageClassificationWithTeacher": (True, False),
    "Dinov2Model": (False, False),
    "Dinov2ForImageClassification": (False, True),
    "Dinov2WithRegistersModel": (False, False),
    "Dinov2WithRegistersForImageClassification": (False, True),
}
_VIT_LAYERS = ("ViTLayer", "DeiTLayer")
_DINO_LAYERS = ("Dinov2Layer", "Dinov2WithRegistersLayer")


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ in _MODELS and cls.__module__.startswith("transformers.")


class ViTLayerView(HFAttentionPart):
    """ViTLayer / DeiTLayer: layernorm_before, attention, dropout, layernorm_after, mlp."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer.attention)
        self.layer = layer
        self.mlp_macs = linear_macs(layer.mlp)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(self.layer.layernorm_before(x))

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        return calls.apply((self.layer.dropout,), calls.linear(self.output_projection, heads_out))

    def mlp_branch(self, x: Tensor) -> Tensor:
        layer = self.layer
        return calls.apply((layer.dropout,), calls.mlp(layer.mlp, layer.layernorm_after(x)))


class Dinov2LayerView(HFAttentionPart):
    """Dinov2Layer: norm1, attention, layer_scale1, drop_path, norm2, mlp, layer_scale2."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer.attention)
        self.layer = layer
        self.mlp_macs = linear_macs(layer.mlp)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(self.layer.norm1(x))

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        layer = self.layer
        projected = calls.linear(self.output_projection, heads_out)
        return calls.apply((layer.drop_path,), layer.layer_scale1(projected))

    def mlp_branch(self, x: Tensor) -> Tensor:
        layer = self.layer
        return calls.apply((layer.drop_path,), layer.layer_scale2(calls.mlp(layer.mlp, layer.norm2(x))))


def _find_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            type(m).__name__ in _VIT_LAYERS + _DINO_LAYERS for m in module
        ):
            return module
    raise TypeError(f"found no ViT/DeiT/Dinov2 layers in {type(model).__name__}")


def resolve(model: nn.Module) -> Host:
    distilled, mean_pooled = _MODELS[type(model).__name__]
    config = model.config
    layers = _find_layers(model)
    views = [ViTLayerView(m) if type(m).__name__ in _VIT_LAYERS else Dinov2LayerView(m) for m in layers]
    registers = getattr(config, "num_register_tokens", 0)
    prefix = 1 + int(distilled) + registers
    image = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    patches = math.ceil(image / patch) ** 2
    first = views[0]
    spec = ModelSpec(
        family=f"transformers {type(model).__name__}", depth=len(views), dim=config.hidden_size,
        num_heads=first.num_heads, head_dim=first.head_dim, prefix=prefix, has_class_token=True,
        input_tokens=patches + prefix, image_size=image,
    )
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return Host(
        spec=spec, blocks=list(layers), views=views, mean_pooled=mean_pooled,
        embed_macs_per_patch=conv.weight.numel(),
        head_macs=linear_macs(model) - linear_macs(layers),
        checkpoints_in_layers=True,
    )

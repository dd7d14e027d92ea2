"""transformers BLIP vision tower (BlipVisionModel)."""

from __future__ import annotations

from torch import Tensor, nn

from tokensieve import calls
from tokensieve.hosts.base import Host, linear_macs
from tokensieve.spec import ModelSpec

FAMILY = "transformers BlipVisionModel"


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ == "BlipVisionModel" and cls.__module__.startswith("transformers.")


class BlipLayerView:
    """BlipEncoderLayer: layer_norm1, self_attn (fused qkv, projection), layer_norm2, mlp."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.attention = layer, layer.self_attn
        self.num_heads, self.head_dim = self.attention.num_heads, self.attention.head_dim
        self.scale = self.attention.scale
        self.attention_linear_macs = linear_macs(self.attention)
        self.mlp_macs = linear_macs(layer.mlp)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = x.shape
        qkv = calls.linear(self.attention.qkv, self.layer.layer_norm1(x))
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        return calls.linear(self.attention.projection, heads_out)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return calls.mlp(self.layer.mlp, self.layer.layer_norm2(x))

    def attention_dropout(self) -> float:
        return self.attention.dropout.p if self.attention.training else 0.0


def resolve(model: nn.Module) -> Host:
    layers = list(model.encoder.layers)
    views = [BlipLayerView(layer) for layer in layers]
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    spec = ModelSpec(
        family="transformers BlipVisionModel", depth=len(views), dim=config.hidden_size,
        num_heads=views[0].num_heads, head_dim=views[0].head_dim, prefix=1, has_class_token=True,
        input_tokens=patches + 1, image_size=config.image_size,
    )
    return Host(
        spec=spec, blocks=layers, views=views, mean_pooled=False,
        embed_macs_per_patch=model.embeddings.patch_embedding.weight.numel(), head_macs=0,
        checkpoints_in_layers=True,
    )

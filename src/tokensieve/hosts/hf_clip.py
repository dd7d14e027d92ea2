"""transformers CLIP vision tower (CLIPVisionModel, CLIPVisionModelWithProjection)."""

from __future__ import annotations

from torch import Tensor, nn

from tokensieve import calls
from tokensieve.hosts.base import Host, linear_macs
from tokensieve.hosts.hf_attention import HFAttentionPart
from tokensieve.spec import ModelSpec

FAMILY = "transformers CLIPVisionModel/CLIPVisionModelWithProjection"
_MODELS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ in _MODELS and cls.__module__.startswith("transformers.")


class CLIPLayerView(HFAttentionPart):
    """CLIPEncoderLayer: layer_norm1, self_attn, residual, layer_norm2, mlp, residual."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer.self_attn)
        self.layer = layer
        self.mlp_macs = linear_macs(layer.mlp)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(self.layer.layer_norm1(x))

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        return calls.linear(self.output_projection, heads_out)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return calls.mlp(self.layer.mlp, self.layer.layer_norm2(x))


def resolve(model: nn.Module) -> Host:
    tower = getattr(model, "vision_model", model)  # the projection model wraps a vision model
    layers = list(tower.encoder.layers)
    views = [CLIPLayerView(layer) for layer in layers]
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    spec = ModelSpec(
        family=f"transformers {type(model).__name__}", depth=len(views), dim=config.hidden_size,
        num_heads=views[0].num_heads, head_dim=views[0].head_dim, prefix=1, has_class_token=True,
        input_tokens=patches + 1, image_size=config.image_size,
    )
    projection = getattr(model, "visual_projection", None)
    return Host(
        spec=spec, blocks=layers, views=views, mean_pooled=False,
        embed_macs_per_patch=tower.embeddings.patch_embedding.weight.numel(),
        head_macs=linear_macs(projection) if projection is not None else 0,
        checkpoints_in_layers=True,
    )

"""timm VisionTransformer (ViT, DeiT, DeiT-III, register models): reading its blocks."""

from __future__ import annotations

from torch import Tensor, nn

from tokensieve import calls
from tokensieve.hosts.base import Host, linear_macs
from tokensieve.spec import ModelSpec

FAMILY = "timm VisionTransformer (vit_*, deit_*, deit3_*, *_reg*)"


def matches(model: nn.Module) -> bool:
    """A timm VisionTransformer or subclass (VisionTransformerDistilled for distilled DeiT)."""
    return any(cls.__name__ == "VisionTransformer" and cls.__module__.startswith("timm.")
               for cls in type(model).__mro__)


class TimmBlockView:
    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        if type(block).__name__ != "Block" or type(attn).__name__ != "Attention":
            raise TypeError(f"tokensieve supports timm's pre-norm Block with Attention, not "
                            f"{type(block).__name__}/{type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TypeError("tokensieve does not support timm's gated attention")
        self.block, self.attn = block, attn
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attention_linear_macs = linear_macs(attn)
        self.mlp_macs = linear_macs(block.mlp)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = x.shape
        qkv = calls.linear(self.attn.qkv, self.block.norm1(x))
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return calls.apply((self.attn.q_norm,), q), calls.apply((self.attn.k_norm,), k), v

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        attn, block = self.attn, self.block
        heads_out = calls.apply((attn.norm,), heads_out)
        return calls.apply((attn.proj_drop, block.ls1, block.drop_path1), calls.linear(attn.proj, heads_out))

    def mlp_branch(self, x: Tensor) -> Tensor:
        block = self.block
        return calls.apply((block.ls2, block.drop_path2), calls.mlp(block.mlp, block.norm2(x)))

    def attention_dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0


def resolve(model: nn.Module) -> Host:
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("tokensieve does not support timm models with attention pooling heads (attn_pool)")
    blocks = list(model.blocks)
    views = [TimmBlockView(block) for block in blocks]
    first = views[0]
    dim = model.embed_dim
    prefix = model.num_prefix_tokens
    patches = model.patch_embed.num_patches
    pool = model.global_pool
    spec = ModelSpec(
        family=FAMILY, depth=len(blocks), dim=dim, num_heads=first.num_heads, head_dim=first.head_dim,
        prefix=prefix, has_class_token=model.cls_token is not None, input_tokens=patches + prefix,
        image_size=model.patch_embed.img_size[0],
    )
    conv = model.patch_embed.proj
    return Host(
        spec=spec, blocks=blocks, views=views,
        mean_pooled=pool in ("avg", "avgmax", "max"),
        embed_macs_per_patch=conv.weight.numel(),
        head_macs=_head_macs(model),
        intermediates=("forward_intermediates",),  # get_intermediate_layers calls it too
        checkpoints_reentrantly=_checkpoints_reentrantly,
    )


def _checkpoints_reentrantly(model: nn.Module) -> bool:
    """Whether timm's forward runs the blocks through reentrant checkpointing: its checkpointing is
    on (`set_grad_checkpointing`) and timm's process-wide mode is reentrant (`set_reentrant_ckpt`)."""
    if not getattr(model, "grad_checkpointing", False):
        return False
    import timm.layers  # the model is timm's: timm is imported already

    # timm before use_reentrant_ckpt checkpointed with torch's default, which is reentrant
    use_reentrant = getattr(timm.layers, "use_reentrant_ckpt", None)
    return use_reentrant is None or bool(use_reentrant())


def _head_macs(model: nn.Module) -> int:
    """Classifier MACs per image: the head, and the distillation head of distilled DeiT."""
    heads = [getattr(model, name, None) for name in ("head", "head_dist")]
    return sum(linear_macs(head) for head in heads if isinstance(head, nn.Module))


__all__ = ["FAMILY", "TimmBlockView", "matches", "resolve"]

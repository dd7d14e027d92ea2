"""One file per model family: how to read its blocks. No method logic here."""

from __future__ import annotations

from torch import nn

from tokensieve.hosts import hf_blip, hf_blip_text, hf_clip, hf_clip_text, hf_sam, hf_vit, timm_vit
from tokensieve.hosts.base import (
    BlockCall,
    BlockView,
    CrossAttentionView,
    Host,
    PositionalAttention,
    runs_own_attention,
)

_FAMILIES = (timm_vit, hf_vit, hf_clip, hf_blip, hf_clip_text, hf_blip_text, hf_sam)


def resolve_host(model: nn.Module) -> Host:
    """The Host for `model`, or a TypeError naming the supported families."""
    for family in _FAMILIES:
        if family.matches(model):
            return family.resolve(model)
    supported = "; ".join(f.FAMILY for f in _FAMILIES)
    raise TypeError(f"tokensieve cannot patch {type(model).__module__}.{type(model).__name__}. "
                    f"Supported: {supported}")


__all__ = ["BlockCall", "BlockView", "CrossAttentionView", "Host", "PositionalAttention", "resolve_host",
           "runs_own_attention"]

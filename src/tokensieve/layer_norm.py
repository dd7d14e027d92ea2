"""LayerNorm over the channels of a [B, C, H, W] map, as SAM's neck and a ViT's feature pyramid
use it."""

from __future__ import annotations

from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each position of a [B, C, H, W] map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

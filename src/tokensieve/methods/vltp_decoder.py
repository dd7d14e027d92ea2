"""VLTP's pruning decoder: a slim SAM mask decoder that rates each cell of a mid-encoder map by its
relevance to a task, given the task's guidance token(s).

    map [B, rows, cols, C] ─ neck (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d) ─► image tokens [B, N, W]
    guidance [B, T, D] ─ Linear(D, W) ─┐
    [query token, guidance tokens] ────┴─ two-way transformer (with the map's Fourier positions)
    relevance logit of cell n = query · image token n / √W                          ─► [B, N]

Its cost is counted exactly (`macs`), as overhead of the encoder it prunes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve.layer_norm import LayerNorm2d

FOURIER_SCALE = 1.0  # SAM's scale for its random position features
MLP_RATIO = 4
ATTENTION_DOWNSAMPLE = 2  # the cross-attentions run at half the width, as in SAM's two-way transformer


class Attention(nn.Module):
    """Multi-head attention whose inner width may be smaller than its input's (`downsample`)."""

    def __init__(self, width: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = width // downsample
        if inner % heads:
            raise ValueError(f"the decoder's attention width {inner} does not split into {heads} heads; "
                             "choose a width divisible by heads × 2")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, inner) for _ in range(3))
        self.out = nn.Linear(inner, width)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        q, k, v = (self._split(proj(x)) for proj, x in ((self.q, queries), (self.k, keys), (self.v, values)))
        mixed = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Nq, d]
        return self.out(mixed.transpose(1, 2).flatten(2))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def macs(self, queries: int, keys: int) -> int:
        width, inner = self.q.in_features, self.q.out_features
        projections = queries * width * inner * 2 + keys * width * inner * 2  # q and out; k and v
        return projections + 2 * queries * keys * inner  # q·k and weights·v


class TwoWayLayer(nn.Module):
    """Token self-attention, tokens → image, token MLP, image → tokens; post-norm, positions added
    to the queries and keys of every attention (not to the first layer's token self-attention
    queries' values: SAM's convention)."""

    def __init__(self, width: int, heads: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.self_attention = Attention(width, heads)
        self.to_image = Attention(width, heads, ATTENTION_DOWNSAMPLE)
        hidden = MLP_RATIO * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.to_tokens = Attention(width, heads, ATTENTION_DOWNSAMPLE)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))

    def forward(self, tokens: Tensor, image: Tensor, token_pe: Tensor,
                image_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.first:
            tokens = self.self_attention(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attention(q, q, tokens)
        tokens = self.norms[0](tokens)
        tokens = self.norms[1](tokens + self.to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](image + self.to_tokens(image + image_pe, tokens + token_pe, tokens))
        return tokens, image

    def macs(self, tokens: int, cells: int) -> int:
        width = self.mlp[0].in_features
        return (self.self_attention.macs(tokens, tokens) + self.to_image.macs(tokens, cells)
                + 2 * tokens * width * MLP_RATIO * width + self.to_tokens.macs(cells, tokens))


class PruningDecoder(nn.Module):
    """Relevance logits [B, N] of the N cells of a [B, rows, cols, C] map to guidance [B, T, D]."""

    def __init__(self, dim: int, guidance_width: int, width: int = 256, heads: int = 8,
                 layers: int = 2) -> None:
        super().__init__()
        self.width = width
        self.neck = nn.Sequential(nn.Conv2d(dim, width, 1, bias=False), LayerNorm2d(width),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), LayerNorm2d(width))
        self.guidance = nn.Linear(guidance_width, width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.layers = nn.ModuleList(TwoWayLayer(width, heads, first=i == 0) for i in range(layers))
        self.final = Attention(width, heads, ATTENTION_DOWNSAMPLE)
        self.final_norm = nn.LayerNorm(width)
        # SAM's random Fourier features of a cell's (x, y) in [0, 1]: fixed, stored with the decoder
        self.register_buffer("fourier", torch.randn(2, width // 2) * FOURIER_SCALE)
        self._positions: Tensor | None = None
        self._positions_key: tuple | None = None

    def forward(self, features: Tensor, guidance: Tensor) -> Tensor:
        """features [B, rows, cols, C], guidance [B, T, D] -> relevance logits [B, rows · cols]."""
        rows, cols = features.shape[1:3]
        image = self.neck(features.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)  # [B, N, W]
        image_pe = self.positions(rows, cols).to(image.dtype)  # [N, W]
        tokens = torch.cat([self.query.expand(image.shape[0], -1, -1).to(image.dtype),
                            self.guidance(guidance)], dim=1)  # [B, 1 + T, W]
        token_pe = tokens
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        q = tokens + token_pe
        tokens = self.final_norm(tokens + self.final(q, image + image_pe, image))
        return (image @ tokens[:, 0, :, None]).squeeze(-1) / math.sqrt(self.width)

    def positions(self, rows: int, cols: int) -> Tensor:
        """[rows · cols, W] Fourier features of the cell centres, row-major; made once per map size
        and state of the fixed features (they cost no MACs in the forward)."""
        key = (rows, cols, self.fourier.device, self.fourier._version, self.fourier.data_ptr())
        if self._positions_key != key:
            with torch.no_grad():
                self._positions = self._make_positions(rows, cols)
            self._positions_key = key
        return self._positions

    def _make_positions(self, rows: int, cols: int) -> Tensor:
        device = self.fourier.device
        y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
        x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(-1, 2)  # (x, y) per cell
        angles = 2 * math.pi * (2 * grid - 1) @ self.fourier.float()
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def macs(self, cells: int, guidance_tokens: int) -> int:
        """Matrix-product MACs of rating `cells` cells of one image against `guidance_tokens` tokens."""
        dim = self.neck[0].in_channels
        tokens = 1 + guidance_tokens
        neck = cells * dim * self.width + cells * self.width * self.width * 9
        total = neck + guidance_tokens * self.guidance.in_features * self.width
        total += sum(layer.macs(tokens, cells) for layer in self.layers)
        return total + self.final.macs(tokens, cells) + cells * self.width

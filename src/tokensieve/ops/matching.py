"""Bipartite soft matching (ToMe): pair each token of one half with its most similar token
of the other half and merge the r most similar pairs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def bipartite_merge(metric: Tensor, r: int) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Plan the merge of r tokens of `metric` [B, N, d]; return a function that applies it and
    the input position [B, N - r] of the token that each output slot continues.

    Tokens alternate between two sets A (even positions) and B (odd positions). Each A token
    finds its most similar B token (cosine); the r A tokens with the best matches are summed
    into their B partners, the other A tokens stay. The returned function maps any [B, N, ...]
    tensor to [B, N - r, ...]: unmerged A tokens first, then the B tokens. Sums, not means:
    callers weight by token size and divide.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
    best_score, best_partner = similarity.max(dim=-1)  # [B, Na]
    order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]  # [B, r], [B, Na - r]
    partner = best_partner.gather(1, merged_a)  # [B, r]

    def merge(x: Tensor) -> Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        extra = a.shape[2:]
        kept_idx = kept_a.view(*kept_a.shape, *(1,) * len(extra)).expand(-1, -1, *extra)
        merged_idx = merged_a.view(*merged_a.shape, *(1,) * len(extra)).expand(-1, -1, *extra)
        partner_idx = partner.view(*partner.shape, *(1,) * len(extra)).expand(-1, -1, *extra)
        b = b.scatter_add(1, partner_idx, a.gather(1, merged_idx))
        return torch.cat([a.gather(1, kept_idx), b], dim=1)

    tokens = metric.shape[1]
    b_positions = torch.arange(1, tokens, 2, device=metric.device).expand(metric.shape[0], -1)
    survivors = torch.cat([2 * kept_a, b_positions], dim=1)
    return merge, survivors


def matching_macs(tokens: int, dim: int) -> int:
    """Multiply-accumulates of the similarity matrix for `tokens` tokens of width `dim`."""
    return ((tokens + 1) // 2) * (tokens // 2) * dim

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
    batch, tokens = metric.shape[:2]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
    best_score, best_partner = similarity.max(dim=-1)  # [B, Na]
    order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]  # [B, r], [B, Na - r]
    partner = best_partner.gather(1, merged_a)  # [B, r]

    # Row numbers in the flattened [B * N] input and [B * (N - r)] output, so that every copy
    # moves whole token rows (index_select / index_add_) instead of single elements.
    kept_count, b_count, out_tokens = kept_a.shape[1], tokens // 2, tokens - r
    row = torch.arange(batch, device=metric.device)[:, None]
    kept_rows = (row * tokens + 2 * kept_a).flatten()
    merged_rows = (row * tokens + 2 * merged_a).flatten()
    partner_rows = (row * out_tokens + kept_count + partner).flatten()

    def merge(x: Tensor) -> Tensor:
        extra = x.shape[2:]
        width = x[0, 0].numel()
        flat = x.reshape(batch * tokens, width)
        out = torch.empty(batch, out_tokens, width, dtype=x.dtype, device=x.device)
        out[:, :kept_count] = flat.index_select(0, kept_rows).view(batch, kept_count, width)
        out[:, kept_count:] = x[:, 1::2].reshape(batch, b_count, width)
        out = out.view(batch * out_tokens, width)
        out.index_add_(0, partner_rows, flat.index_select(0, merged_rows))
        return out.view(batch, out_tokens, *extra)

    b_positions = torch.arange(1, tokens, 2, device=metric.device).expand(batch, -1)
    survivors = torch.cat([2 * kept_a, b_positions], dim=1)
    return merge, survivors


def matching_macs(tokens: int, dim: int) -> int:
    """Multiply-accumulates of the similarity matrix for `tokens` tokens of width `dim`."""
    return ((tokens + 1) // 2) * (tokens // 2) * dim

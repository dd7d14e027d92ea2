"""Choosing which tokens survive: counts, top-k and per-sample (ragged) selection."""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIN_KEPT_TOKENS = 1  # at least this many non-prefix tokens survive any setting


def keep_count(tokens: int | Tensor, keep: float) -> int | Tensor:
    """How many of `tokens` a keep rate retains: ceil(keep * tokens), at least MIN_KEPT_TOKENS.

    `tokens` is an int, or a tensor of per-sample counts (ragged batches).
    """
    if isinstance(tokens, Tensor):
        return torch.ceil(tokens * keep - 1e-9).long().clamp(MIN_KEPT_TOKENS).minimum(tokens)
    return max(MIN_KEPT_TOKENS, min(tokens, math.ceil(keep * tokens - 1e-9)))


def top_positions(scores: Tensor, k: int) -> Tensor:
    """Positions of the k highest scores per row [B, N] -> [B, k], in their original order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def top_positions_with_prefix(scores: Tensor, prefix: int, k: int) -> Tensor:
    """Positions [B, prefix + k] over all tokens: the `prefix` leading tokens, then the k
    best-scoring tokens after them, in original order.

    `scores` [B, N] covers every token. Its prefix entries are overwritten with +inf in place, which
    puts the prefix first in one top-k (no index arithmetic; a fresh tensor is copied only when it
    carries gradient).
    """
    if prefix:
        if scores.requires_grad:
            scores = scores.detach().clone()
        scores[:, :prefix] = torch.inf
    return top_positions(scores, prefix + k)


def select_by_count(scores: Tensor, counts: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep the `counts[b]` best-scoring tokens of each row: a ragged selection.

    Returns positions [B, K] (K = max count; each row's kept tokens first, in original order,
    then padding) and their validity [B, K].
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
    width = int(counts.max())
    ranked = scores.topk(width, dim=1, sorted=True).indices  # [B, K], best first
    kept = torch.arange(width, device=scores.device) < counts[:, None]
    # Reorder: kept tokens in original order first, padding after.
    order_key = torch.where(kept, ranked, ranked + scores.shape[1])
    order = order_key.argsort(dim=1)
    return ranked.gather(1, order), kept.gather(1, order)

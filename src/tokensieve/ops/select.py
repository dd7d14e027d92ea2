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


def keep_top(scores: Tensor, counts: int | Tensor, prefix: int = 0,
             valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The tokens to keep, as slots of the current token sequence: the `prefix` leading tokens,
    then each row's `counts` best-scoring non-prefix tokens in their original order.

    `scores` [B, N - prefix] scores the non-prefix tokens; `counts` is one count for every sample
    (int) or one per sample [B]; `valid` [B, N - prefix] is False on padding, which is never kept.
    Returns slots [B, prefix + K] and their validity [B, prefix + K] (None when every row keeps the
    same count of real tokens: the equal-count fast path, one top-k and no reordering).
    """
    if isinstance(counts, int) and valid is None:
        kept, kept_valid = top_positions(scores, counts), None
    else:
        if isinstance(counts, int):
            counts = torch.full((scores.shape[0],), counts, device=scores.device)
        kept, kept_valid = select_by_count(scores, counts, valid)
    if not prefix:
        return kept, kept_valid
    batch = scores.shape[0]
    slots = torch.cat([torch.arange(prefix, device=kept.device).expand(batch, prefix), kept + prefix], dim=1)
    if kept_valid is not None:
        kept_valid = torch.cat([kept_valid.new_ones(batch, prefix), kept_valid], dim=1)
    return slots, kept_valid


def marked_positions(marks: Tensor, least: int = MIN_KEPT_TOKENS) -> tuple[Tensor, Tensor | None] | None:
    """The positions [B, K] of each row's marked entries (`marks` [B, N] bool) in their original
    order, and their validity [B, K] (None when every row has K marks; else each row's own marks
    first, then padding); None when a row has fewer than `least` marks.

    When the marks are the tokens scoring above a threshold, these are the tokens `keep_top` keeps
    at the marks' counts, found without ranking the scores.
    """
    if marks.shape[0] == 1:  # one row: its marks are the positions, no padding
        positions = marks[0].nonzero().T
        return (positions, None) if positions.shape[1] >= least else None
    counts = marks.sum(dim=1)
    low, width = counts.aminmax()
    low, width = int(low), int(width)
    if low < least:
        return None
    positions = marks.logical_not().argsort(dim=1, stable=True)[:, :width]  # the marks first, in order
    if low == width:
        return positions, None
    return positions, torch.arange(width, device=marks.device) < counts[:, None]


def prunes(counts: int | Tensor, kept: int | Tensor) -> bool:
    """Whether keeping `kept` of `counts` tokens (ints, or per-sample [B]) drops any."""
    if isinstance(counts, Tensor) or isinstance(kept, Tensor):
        return bool((kept < counts).any())
    return kept < counts


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

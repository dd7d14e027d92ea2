"""Bipartite soft matching (ToMe): pair each token of one half with its most similar token
of the other half and merge the r most similar pairs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def bipartite_merge(metric: Tensor, r: int, prefix: int = 0
                    ) -> tuple[Callable[[Tensor], Tensor], Tensor, Callable[[], Tensor]]:
    """Plan the merge of r tokens of `metric` [B, N, d], whose first `prefix` tokens are protected.

    Returns a function mapping any [B, N, ...] tensor to [B, N - r, ...], the input position
    [B, N - r] of the token that each output slot continues, and a function giving the output
    slot [B, N] that each input token went into (computed only when asked). The other tokens
    alternate between sets A (even) and B (odd); each A token finds its most similar B token
    (cosine), and the r A tokens with the best matches are added to their partners. Output
    order: prefix, unmerged A tokens, B tokens. Sums, not means: callers weight by size.
    """
    batch, tokens = metric.shape[:2]
    candidates = metric[:, prefix:]
    # unit length; in place of candidates.norm(), which is slower in the forward (measured)
    candidates = candidates * candidates.square().sum(dim=-1, keepdim=True).rsqrt()
    similarity = candidates[:, ::2] @ candidates[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
    best_score, best_partner = similarity.max(dim=-1)  # [B, Na]
    order = best_score.argsort(dim=-1, descending=True)
    a_positions = torch.add(prefix, order, alpha=2)  # A token i sits at prefix + 2i
    merged_a, kept_a = order[:, :r], order[:, r:]  # [B, r], [B, Na - r]
    partner = best_partner.gather(1, merged_a)  # [B, r]

    prefix_positions, b_positions = _fixed_positions(tokens, prefix, metric.device)
    survivors = torch.cat([prefix_positions.expand(batch, -1), a_positions[:, r:],
                           b_positions.expand(batch, -1)], dim=1)  # [B, N - r]
    # Row numbers in the flattened [B * N] input and [B * (N - r)] output, so that every copy
    # moves whole token rows instead of single elements.
    out_tokens = tokens - r
    sample = None if batch == 1 else torch.arange(batch, device=metric.device)[:, None]  # b = 1: no offsets

    def rows(positions: Tensor, per_sample: int) -> Tensor:
        return (positions if sample is None else positions + sample * per_sample).flatten()

    survivor_rows = rows(survivors, tokens)
    merged_rows = rows(a_positions[:, :r], tokens)
    partner_rows = rows(partner + (prefix + kept_a.shape[1]), out_tokens)

    def merge(x: Tensor) -> Tensor:
        width = x[0, 0].numel()
        flat = x.reshape(batch * tokens, width)
        out = flat.index_select(0, survivor_rows)
        merged = flat.index_select(0, merged_rows)
        if sample is None:  # one sample: the accumulating index_put is the faster (measured)
            out.index_put_((partner_rows,), merged, accumulate=True)
        else:  # many: index_put's accumulation is much slower than index_add (measured at 32)
            out.index_add_(0, partner_rows, merged)
        return out.view(batch, out_tokens, *x.shape[2:])

    def destinations() -> Tensor:
        device = metric.device
        slots = torch.empty(batch, tokens, dtype=torch.long, device=device)
        slots.scatter_(1, survivors, torch.arange(out_tokens, device=device).expand(batch, -1))
        slots.scatter_(1, a_positions[:, :r], prefix + kept_a.shape[1] + partner)
        return slots

    return merge, survivors, destinations


@functools.lru_cache(maxsize=64)
def _fixed_positions(tokens: int, prefix: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The prefix positions [1, prefix] and the B positions [1, Nb]: the same in every call of a
    given size, so built once (callers only read them)."""
    with torch.inference_mode(False):  # usable by any later call, in or out of inference mode
        return (torch.arange(prefix, device=device)[None],
                torch.arange(prefix + 1, tokens, 2, device=device)[None])


def matching_macs(tokens: int, dim: int) -> int:
    """Multiply-accumulates of the similarity matrix for `tokens` tokens of width `dim`."""
    return ((tokens + 1) // 2) * (tokens // 2) * dim

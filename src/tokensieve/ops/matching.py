"""Bipartite soft matching (ToMe): pair each token of one half with its most similar token
of the other half and merge the r most similar pairs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MergePlan:
    """Where bipartite matching sends each token: `survivors` [B, N - r] is the input position of
    the token each output slot continues; `sum`, `average` and `destinations` apply the plan."""

    survivors: Tensor
    sum: Callable[[Tensor], Tensor]  # [B, N, ...] -> [B, N - r, ...]: each slot's tokens summed
    average: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]  # see bipartite_merge
    destinations: Callable[[], Tensor]  # [B, N]: the output slot each input token went into


def bipartite_merge(metric: Tensor, r: int, prefix: int = 0) -> MergePlan:
    """Plan the merge of r tokens of `metric` [B, N, d], whose first `prefix` tokens are protected.

    As in ToMe, the whole sequence alternates between sets A (even positions) and B (odd), prefix
    included: with one class token, the patch tokens at odd positions form B. A protected token sits
    in A or B by its position and takes part in no match (neither merged away nor merged into).
    Each unprotected A token finds its most similar unprotected B token (cosine), and the r A
    tokens with the best matches go into their partners. Output order: prefix, unmerged A tokens,
    B tokens; B in input order, unmerged A in input order when a prefix is protected, else in
    match order, best first (the authors sort them only to keep a class token first).
    `plan.average(x, size)` gives the size-weighted mean features [B, N - r, C] and the sizes
    [B, N - r] (float32) of the merged tokens, `size` [B, N] being how many input tokens each
    token stands for (None: one each).
    """
    batch, tokens = metric.shape[:2]
    first_a, first_b = _first_unprotected(prefix)
    candidates = metric[:, prefix:]
    # unit length: one norm and one division (measured faster than normalize() and than square-sum-rsqrt)
    candidates = candidates / torch.linalg.vector_norm(candidates, dim=-1, keepdim=True)
    set_a, set_b = candidates[:, first_a - prefix :: 2], candidates[:, first_b - prefix :: 2]
    similarity = set_a @ set_b.transpose(-1, -2)  # [B, Na, Nb]
    best_score, best_partner = similarity.max(dim=-1)  # [B, Na]
    order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]  # [B, r], [B, Na - r]
    if prefix:  # in input order, so the next block's alternation pairs neighbours in the sequence
        kept_a = kept_a.sort(dim=-1).values
    partner = best_partner.gather(1, merged_a)  # [B, r]

    prefix_positions, b_positions = _fixed_positions(tokens, prefix, metric.device)
    merged_positions = torch.add(first_a, merged_a, alpha=2)  # A token i sits at first_a + 2i
    survivors = torch.cat([prefix_positions.expand(batch, -1), torch.add(first_a, kept_a, alpha=2),
                           b_positions.expand(batch, -1)], dim=1)  # [B, N - r]
    # Row numbers in the flattened [B * N] input and [B * (N - r)] output, so that every copy
    # moves whole token rows instead of single elements.
    out_tokens = tokens - r
    sample = None if batch == 1 else torch.arange(batch, device=metric.device)[:, None]  # b = 1: no offsets

    def rows(positions: Tensor, per_sample: int) -> Tensor:
        return (positions if sample is None else positions + sample * per_sample).flatten()

    survivor_rows = rows(survivors, tokens)
    merged_rows = rows(merged_positions, tokens)
    partner_rows = rows(partner + (prefix + kept_a.shape[1]), out_tokens)

    def accumulate(out: Tensor, values: Tensor) -> Tensor:
        if sample is None:  # one sample: the accumulating index_put is the faster (measured)
            return out.index_put_((partner_rows,), values, accumulate=True)
        return out.index_add_(0, partner_rows, values)  # many: index_put's accumulation is much slower

    def merge_sum(x: Tensor) -> Tensor:
        flat = x.reshape(batch * tokens, x[0, 0].numel())
        out = accumulate(flat.index_select(0, survivor_rows), flat.index_select(0, merged_rows))
        return out.view(batch, out_tokens, *x.shape[2:])

    def average(x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        # A slot p that takes tokens m gets x_p + sum_m (s_m / S_p) (x_m - x_p), S_p its new size:
        # the size-weighted mean, computed on the r moved rows only, not on every row.
        flat = x.reshape(batch * tokens, x.shape[-1])
        out, moved = flat.index_select(0, survivor_rows), flat.index_select(0, merged_rows)
        if size is None:
            slot_size = torch.ones(batch * out_tokens, dtype=torch.float32, device=x.device)
            moved_size = slot_size.new_ones(batch * r)
        else:
            sizes = size.reshape(batch * tokens)
            slot_size, moved_size = sizes.index_select(0, survivor_rows), sizes.index_select(0, merged_rows)
        merged_size = accumulate(slot_size, moved_size)
        share = (moved_size / merged_size.index_select(0, partner_rows)).to(x.dtype)[:, None]
        accumulate(out, (moved - out.index_select(0, partner_rows)) * share)
        return out.view(batch, out_tokens, x.shape[-1]), merged_size.view(batch, out_tokens)

    def destinations() -> Tensor:
        device = metric.device
        slots = torch.empty(batch, tokens, dtype=torch.long, device=device)
        slots.scatter_(1, survivors, torch.arange(out_tokens, device=device).expand(batch, -1))
        slots.scatter_(1, merged_positions, prefix + kept_a.shape[1] + partner)
        return slots

    return MergePlan(survivors, merge_sum, average, destinations)


def _first_unprotected(prefix: int) -> tuple[int, int]:
    """The first positions at or past the prefix of set A (even) and of set B (odd)."""
    return (prefix, prefix + 1) if prefix % 2 == 0 else (prefix + 1, prefix)


@functools.lru_cache(maxsize=64)
def _fixed_positions(tokens: int, prefix: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The prefix positions [1, prefix] and the unprotected B positions [1, Nb]: the same in every
    call of a given size, so built once (callers only read them)."""
    with torch.inference_mode(False):  # usable by any later call, in or out of inference mode
        return (torch.arange(prefix, device=device)[None],
                torch.arange(_first_unprotected(prefix)[1], tokens, 2, device=device)[None])


def matching_macs(tokens: int, dim: int) -> int:
    """Multiply-accumulates of the similarity matrix for `tokens` tokens of width `dim`."""
    return ((tokens + 1) // 2) * (tokens // 2) * dim

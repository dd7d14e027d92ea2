"""Attention over a token set that may be padded, merged or soft-masked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# A map of this many floats or fewer is computed whole; a larger one a block of query rows at a time:
# a whole [1, 12, 577, 577] map (16 MB) leaves the cache between its product, softmax and reductions,
# and a fresh buffer that size is faulted in again on every call; blocks of a few MB stay cached.
SUMMARY_BLOCK_FLOATS = 3_000_000


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
              dropout: float = 0.0, eager: bool = False) -> Tensor:
    """Softmax attention [B, H, N, d] -> [B, H, N, d].

    `bias` is None, a bool mask (True = may be attended), or an additive float bias, broadcastable
    to [B, H, N, N]: per key [B, 1, 1, N], or per query and key (causal order, relative
    positions). `eager` spells the matmuls out (for FLOP counters and debugging).
    """
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    return attention_and_weights(q, k, v, bias, scale, dropout)[0]


def attention_and_weights(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                          dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax attention spelled out: the output [B, H, N, d] and the map [B, H, N, N] it used
    (before dropout)."""
    weights = attention_weights(q, k, bias, scale)
    return F.dropout(weights, p=dropout, training=dropout > 0) @ v, weights


@dataclass(frozen=True)
class AttentionSummary:
    """What a method reads of an attention map P [B, H, N, N], without holding the map whole.

    `received[b, n]` = Σ_q queries[b, q] · max_h P[b, h, q, n] (fp32): the attention each token
    receives from the weighted queries, each query's strongest head; `first_row` = P[:, :, 0] [B, H, N], the
    first (class) token's attention in every head.
    """

    received: Tensor
    first_row: Tensor


def summarize_attention(weights: Tensor, queries: Tensor) -> AttentionSummary:
    """The summary of a whole map `weights` [B, H, N, N], `queries` [B, N] weighting its rows."""
    strongest = weights.amax(dim=1).float()  # [B, N, N]: each query's strongest head
    received = torch.bmm(queries.float()[:, None, :], strongest)[:, 0]  # summed over queries in fp32
    return AttentionSummary(received, weights[:, :, 0])


def attention_and_summary(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                          queries: Tensor, dropout: float = 0.0) -> tuple[Tensor, AttentionSummary]:
    """Softmax attention spelled out [B, H, N, d] and the summary of its map (before dropout),
    with `queries` [B, N] weighting the map's rows (`summarize_attention`).

    A large map is computed a block of query rows at a time, each block's output and share of the
    summary taken before the next: the same numbers as `attention_and_weights` without the whole map.
    """
    batch, heads, tokens, _ = q.shape
    rows = max(32, SUMMARY_BLOCK_FLOATS // (batch * heads * k.shape[2]))
    # Without autograd every block's map is written into one buffer, its softmax in place: a fresh
    # map-sized buffer is faulted in page by page at each allocation, which costs a pass of its own.
    buffer = None if torch.is_grad_enabled() else q.new_empty(batch, heads, min(rows, tokens), k.shape[2])
    if rows >= tokens:
        weights = attention_weights(q, k, bias, scale, out=buffer)
        output = F.dropout(weights, p=dropout, training=dropout > 0) @ v
        return output, summarize_attention(weights, queries)
    # Laid out once for the blocks' products: a view of a packed projection (heads split from
    # tokens) would be copied into the layout a batched product needs at every block.
    k, v = k.contiguous(), v.contiguous()
    outputs, received, first_row = [], None, None
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        block_bias = bias if bias is None or bias.shape[-2] == 1 else bias[..., start:stop, :]
        out = buffer if stop - start == rows else None  # a last, shorter block gets its own
        weights = attention_weights(q[:, :, start:stop], k, block_bias, scale, out=out)  # [B, H, rows, N]
        outputs.append(F.dropout(weights, p=dropout, training=dropout > 0) @ v)
        part = summarize_attention(weights, queries[:, start:stop])
        received = part.received if received is None else received + part.received
        if first_row is None:  # the first block's, kept apart from the buffer the next block overwrites
            first_row = part.first_row if out is None else part.first_row.clone()
    return torch.cat(outputs, dim=2), AttentionSummary(received, first_row)


def attention_weights(q: Tensor, k: Tensor, bias: Tensor | None, scale: float,
                      out: Tensor | None = None) -> Tensor:
    """The softmax attention map [B, H, N, N] (`bias` as in `attention`); with `out` (no autograd),
    written into that buffer, masked and normalised in place."""
    if out is None:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits.masked_fill(~bias, -torch.inf) if bias.dtype == torch.bool else logits + bias
        return logits.softmax(dim=-1)
    logits = torch.matmul(q * scale, k.transpose(-2, -1), out=out)
    if bias is not None:
        if bias.dtype == torch.bool:
            logits.masked_fill_(~bias, -torch.inf)
        else:
            logits.add_(bias)
    return torch.softmax(logits, dim=-1, out=logits)


def class_attention(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Attention of the first (class) token to every token, averaged over heads: [B, N].

    Costs one row of the attention map, so the fused kernel can still compute the rest.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    if bias is not None:
        bias = bias[:, :, :1]  # the class token's row of a per-query mask
        logits = logits.masked_fill(~bias, -torch.inf) if bias.dtype == torch.bool else logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def policy_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float,
                     mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Attention in which key j takes part with weight keep[b, j] (0/1 with gradient).

    Every token still attends to itself, so a pruned token's row stays well defined. `mask` (bool,
    [B, 1, 1 or N, N], True = may be attended) removes padding keys and keeps causal order; `bias`
    is an additive float bias broadcastable to [B, H, N, N] (relative positions). Used in
    mask-mode training, where the decisions must stay differentiable.
    """
    logits = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    if bias is not None:
        logits = logits + bias
    tokens = logits.shape[-1]
    eye = torch.eye(tokens, dtype=logits.dtype, device=logits.device)
    policy = keep[:, None, None, :] + (1.0 - keep[:, None, None, :]) * eye  # [B, 1, N, N]
    if mask is not None:
        policy = policy * mask
    # Shift by the largest logit among the keys a row may attend, not among all keys: a pruned key
    # far above the kept ones would leave their exp() near zero, and dividing by that vanishing sum
    # sends the gradients to inf. A pruned key's exp() (zero in the forward, its keep decision's
    # gradient in the backward) is capped at the strongest kept key's, so that gradient stays bounded.
    allowed = policy > 0.5
    shift = logits.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True).detach()
    logits = logits - shift.nan_to_num(nan=0.0, neginf=0.0)  # a row with no key: weights stay 0
    logits = torch.where(allowed, logits, logits.clamp_max(0.0))
    weights = logits.exp() * policy
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights @ v

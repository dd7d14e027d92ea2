"""Pure tensor functions: no module state, no knowledge of hosts or methods."""

from tokensieve.ops.attention import attention, class_attention, policy_attention
from tokensieve.ops.masks import causal_mask, key_mask
from tokensieve.ops.matching import bipartite_merge
from tokensieve.ops.select import (
    MIN_KEPT_TOKENS,
    keep_count,
    select_by_count,
    top_positions,
    top_positions_with_prefix,
)

__all__ = [
    "MIN_KEPT_TOKENS",
    "attention",
    "bipartite_merge",
    "causal_mask",
    "class_attention",
    "keep_count",
    "key_mask",
    "policy_attention",
    "select_by_count",
    "top_positions",
    "top_positions_with_prefix",
]

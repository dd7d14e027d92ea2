"""Pure tensor functions: no module state, no knowledge of hosts or methods."""

from tokensieve.ops.attention import (
    AttentionSummary,
    attention,
    attention_and_summary,
    attention_and_weights,
    attention_weights,
    class_attention,
    policy_attention,
    summarize_attention,
)
from tokensieve.ops.masks import causal_mask, key_mask
from tokensieve.ops.matching import bipartite_merge
from tokensieve.ops.select import (
    MIN_KEPT_TOKENS,
    keep_count,
    keep_top,
    marked_positions,
    prunes,
    select_by_count,
    top_positions,
)

__all__ = [
    "MIN_KEPT_TOKENS",
    "AttentionSummary",
    "attention",
    "attention_and_summary",
    "attention_and_weights",
    "attention_weights",
    "bipartite_merge",
    "causal_mask",
    "class_attention",
    "keep_count",
    "keep_top",
    "key_mask",
    "marked_positions",
    "policy_attention",
    "prunes",
    "select_by_count",
    "summarize_attention",
    "top_positions",
]

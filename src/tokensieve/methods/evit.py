"""EViT: keep the tokens the class token attends to most and fuse the rest into one token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tokensieve import ops
from tokensieve.methods.base import (
    AttentionView,
    Method,
    RunContext,
    check_keep,
    check_layers,
    needs_class_token,
)
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class EViT(Method):
    """At each of `layers`, keep ceil(keep * n) of the n non-prefix tokens by class attention
    (mean over heads); with `fuse`, the others become one attention-weighted token. In a padded
    batch (padded text), n counts each sample's own tokens."""

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: bool = True

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        check_keep(self.keep, "EViT")
        check_layers(self.layers, spec.depth, "EViT")
        needs_class_token(spec, "EViT")
        return None

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        ctx: RunContext) -> TokenState:
        if layer not in self.layers:
            return state
        if state.valid is not None:
            return self._reduce_ragged(state, attn)
        tokens = state.tokens - state.prefix
        k = ops.keep_count(tokens, self.keep)
        if k == tokens:
            return state
        scores = attn.class_attention(include_prefix=True)  # [B, N]
        positions = ops.top_positions_with_prefix(scores, state.prefix, k)
        if not self.fuse:
            return state.select(positions)
        if state.trace is not None:
            state.trace.add_overhead("fuse", tokens * state.x.shape[-1])
        return state.select_and_fuse(positions, scores)

    def _reduce_ragged(self, state: TokenState, attn: AttentionView) -> TokenState:
        """Padded batches (e.g. padded text): each sample keeps its own share of its own tokens."""
        counts = state.patch_counts()
        kept_counts = ops.keep_count(counts, self.keep)
        if bool((kept_counts == counts).all()):  # nothing to prune: padding rows stay as they are
            return state
        scores = attn.class_attention()  # [B, Np]
        kept, kept_valid = ops.select_by_count(scores, kept_counts, state.valid[:, state.prefix :])
        if not self.fuse:
            return state.gather(kept, kept_valid)
        if state.trace is not None:
            state.trace.add_overhead("fuse", counts * state.x.shape[-1])
        return state.fuse_rest(kept, scores, kept_valid)

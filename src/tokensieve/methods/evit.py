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
    (mean over heads); with `fuse`, the others become one attention-weighted token."""

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
            raise ValueError("EViT runs on equal token counts; it cannot follow a ragged selection")
        tokens = state.tokens - state.prefix
        k = ops.keep_count(tokens, self.keep)
        if k == tokens:
            return state
        scores = attn.class_attention()  # [B, Np]
        kept = ops.top_positions(scores, k)
        if not self.fuse:
            return state.gather(kept)
        if state.trace is not None:
            state.trace.add_overhead("fuse", tokens * state.x.shape[-1])
        return state.fuse_rest(kept, scores)

"""EViT: keep the tokens the class token attends to most and fuse the rest into one token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tokensieve import ops
from tokensieve.methods.base import AttentionView, Method, MethodRun, needs_class_token
from tokensieve.methods.fields import check_layers, flag, layer_indices, settle, share
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class EViT(Method):
    """At each of `layers`, keep ceil(keep * n) of the n non-prefix tokens by class attention
    (mean over heads); with `fuse`, the others become one token placed after the kept ones, their
    sum weighted by that attention (as the authors fuse them: not divided by the weights' sum). A
    fused token counts among the n of a later layer. In a padded batch (padded text), n counts
    each sample's own tokens."""

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: bool = True

    def __post_init__(self) -> None:
        settle(self, keep=share, layers=layer_indices, fuse=flag)

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        check_layers(self.layers, spec.depth, "EViT")
        needs_class_token(spec, "EViT")
        return None

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        run: MethodRun) -> TokenState:
        if layer not in self.layers:
            return state
        counts = state.patch_counts()
        kept = ops.keep_count(counts, self.keep)
        if not ops.prunes(counts, kept):
            return state
        scores = attn.class_attention()  # [B, Np]
        slots, valid = ops.keep_top(scores, kept, state.prefix, state.patch_valid())
        if not self.fuse:
            return state.select(slots, valid)
        if state.trace is not None:
            state.trace.add_overhead("fuse", counts * state.x.shape[-1])
        return state.fuse_rest(slots, scores, valid)

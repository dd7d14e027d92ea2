"""Top-K: keep the tokens the class token attends to most, drop the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.methods.base import AttentionView, Method, MethodRun, needs_class_token
from tokensieve.methods.fields import check_layers, layer_indices, optional, settle, share
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class TopK(Method):
    """Keep the `keep` fraction of tokens with the highest class attention at each of `layers`.

    With `mass` set, each image keeps instead the fewest tokens that together hold that share of
    the class attention, so counts differ per image (a ragged batch).
    """

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    mass: float | None = None

    def __post_init__(self) -> None:
        settle(self, keep=share, layers=layer_indices, mass=optional(share))

    @property
    def ragged(self) -> bool:
        return self.mass is not None

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        check_layers(self.layers, spec.depth, type(self).__name__)
        needs_class_token(spec, type(self).__name__)
        return None

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        run: MethodRun) -> TokenState:
        if layer not in self.layers:
            return state
        counts = state.patch_counts()
        if self.mass is None:
            kept = ops.keep_count(counts, self.keep)
            if not ops.prunes(counts, kept):
                return state
            scores = attn.class_attention()  # [B, Np]
        else:
            scores = attn.class_attention()
            kept = _attention_mass_counts(state, scores, self.mass)
            if not ops.prunes(counts, kept):
                return state
        return state.select(*ops.keep_top(scores, kept, state.prefix, state.patch_valid()))


def _attention_mass_counts(state: TokenState, scores: Tensor, mass: float) -> Tensor:
    """[B] the fewest tokens of each sample that together hold `mass` of its class attention."""
    valid = state.patch_valid()
    if valid is not None:
        scores = scores * valid
    shares = scores / scores.sum(dim=1, keepdim=True)
    ranked = shares.sort(dim=1, descending=True).values
    # Tokens needed: 1 + how many best-first prefixes still fall short of the mass.
    counts = (ranked.cumsum(dim=1) < mass - 1e-6).sum(dim=1) + 1
    counts = counts.clamp(ops.MIN_KEPT_TOKENS, scores.shape[1])
    if valid is not None:  # rounding must not count padding in
        counts = torch.minimum(counts, valid.sum(dim=1))
    return counts


__all__ = ["TopK"]

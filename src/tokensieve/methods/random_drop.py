"""RandomDrop: keep a random share of the tokens, the control every scored method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokensieve import ops
from tokensieve.methods.base import Method, MethodRun, check_keep, check_layers
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class RandomDrop(Method):
    """Before each of `layers`, keep a random `keep` share of the non-prefix tokens.

    The draw comes from a generator seeded with (`seed`, layer) at every call, so a forward is
    deterministic and repeatable, and every image of a batch gets its own random choice. With
    `dense=True` the dropped tokens stay in place with the features they had.
    """

    keep: float = 0.5
    layers: tuple[int, ...] = (6,)
    seed: int = 0

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        check_keep(self.keep, type(self).__name__)
        check_layers(self.layers, spec.depth, type(self).__name__)
        return None

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer not in self.layers:
            return state
        counts = state.patch_counts()
        kept = ops.keep_count(counts, self.keep)
        if not ops.prunes(counts, kept):
            return state
        batch, tokens = state.x.shape[0], state.x.shape[1] - state.prefix
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        scores = torch.rand(batch, tokens, generator=generator).to(state.x.device)
        return state.select(*ops.keep_top(scores, kept, state.prefix, state.patch_valid()))


__all__ = ["RandomDrop"]

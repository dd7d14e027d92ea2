"""RandomDrop: keep a random share of the tokens, the control every scored method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.methods.base import Method, MethodRun
from tokensieve.methods.fields import check_layers, layer_indices, settle, share, whole
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class RandomDrop(Method):
    """Before each of `layers`, keep a random `keep` share of the non-prefix tokens.

    Each input draws over its own real tokens from a generator seeded with (`seed`, layer): its
    j-th token (in sequence order, padding skipped) gets the j-th number of the draw. So a forward
    is deterministic and repeatable, the same in training and in eval, and an input's choice
    depends only on the seed, the layer and its own token count, never on its row or on the padded
    length of its batch: a text pruned in a padded batch gives what it gives alone. Inputs with as
    many tokens get the same choice. With `dense=True` the dropped tokens stay in place with the
    features they had.
    """

    keep: float = 0.5
    layers: tuple[int, ...] = (6,)
    seed: int = 0

    def __post_init__(self) -> None:
        settle(self, keep=share, layers=layer_indices, seed=whole)

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        check_layers(self.layers, spec.depth, type(self).__name__)
        return None

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer not in self.layers:
            return state
        counts = state.patch_counts()
        kept = ops.keep_count(counts, self.keep)
        if not ops.prunes(counts, kept):
            return state
        valid = state.patch_valid()
        scores = self._draw(layer, valid, state.tokens - state.prefix)  # [B or 1, N - prefix]
        scores = scores.to(state.x.device).expand(state.x.shape[0], -1)
        return state.select(*ops.keep_top(scores, kept, state.prefix, valid))

    def _draw(self, layer: int, valid: Tensor | None, width: int) -> Tensor:
        """Scores [B or 1, width] of the non-prefix tokens: each input's j-th real token gets the j-th
        number of a draw of its own real-token count from a generator seeded with (seed, layer)."""
        if valid is None:  # every input has `width` real tokens: one draw serves the whole batch
            return self._numbers(layer, width)[None]
        valid = valid.cpu()
        counts = valid.sum(dim=1)
        table = torch.zeros(len(counts), width)  # [B, width]: row b holds the draw of b's count
        for count in counts.unique().tolist():  # one draw per distinct count
            table[counts == count, :count] = self._numbers(layer, count)
        real_rank = (valid.cumsum(dim=1) - 1).clamp_min(0)  # j for the j-th real token
        return table.gather(1, real_rank)  # padding rows get a number too; keep_top never keeps them

    def _numbers(self, layer: int, count: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        return torch.rand(count, generator=generator)


__all__ = ["RandomDrop"]

"""What the executor needs from a model family: its blocks, split into the pieces it calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


class BlockView(Protocol):
    """A pre-norm transformer block seen through the host's own sub-modules."""

    num_heads: int
    head_dim: int
    scale: float
    attention_linear_macs: int  # per token: q, k, v and output projections
    mlp_macs: int  # per token

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block input [B, N, C] -> normalised queries, keys, values [B, H, N, d]."""

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        """Attention output [B, N, H*d] -> the residual update (projection, scale, drop-path)."""

    def mlp_branch(self, x: Tensor) -> Tensor:
        """Block state after attention [B, N, C] -> the MLP's residual update."""

    def attention_dropout(self) -> float:
        """Dropout on attention weights for the current train/eval mode."""


class PositionalAttention(Protocol):
    """Optional on a BlockView whose attention depends on where the tokens sit (windows,
    relative-position bias: SAM). Such a view runs attention itself over the active tokens, at
    their input positions `state.index`, instead of the executor's attention over all of them.
    """

    def attend(self, x: Tensor, state: TokenState, eager: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Block input [B, N, C] -> attention output [B, N, H*d] (before the output projection),
        and the queries and keys [B, H, N, d] of the active tokens, for methods that score from
        them. Ragged padding (`state.valid`) is no key; `state.keep` weighs keys (mask mode)."""

    def attention_macs(self, index: Tensor, valid: Tensor | None, map_size: tuple[int, int] | None) -> Tensor:
        """[B] MACs of the attention products (scores, weighted values, positional bias) for the
        tokens at input positions `index` [B, N] (`valid`: which are real)."""


def runs_own_attention(view: BlockView) -> bool:
    """Whether `view` runs attention itself (PositionalAttention)."""
    return callable(getattr(view, "attend", None))


@dataclass
class Host:
    """A supported model, resolved: what the executor runs and what FLOP counts need."""

    spec: ModelSpec
    blocks: list[nn.Module]
    views: list[BlockView]
    mean_pooled: bool  # the head averages the patch tokens: merged tokens are weighted by size
    embed_macs_per_patch: int
    head_macs: int  # per sample: layers applied to the pooled features


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

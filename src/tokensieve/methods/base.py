"""What every method is: a frozen config that scores, selects and reduces tokens at its layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from tokensieve import ops
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass
class AttentionView:
    """The attention inputs of the block being run, for methods that score tokens from them."""

    q: Tensor  # [B, H, N, d]
    k: Tensor  # [B, H, N, d]
    bias: Tensor | None  # mask or additive bias on keys, [B, 1, 1, N]
    scale: float
    state: TokenState

    def class_attention(self, include_prefix: bool = False) -> Tensor:
        """How much the class token attends to each non-prefix token, mean over heads: [B, N - prefix];
        with `include_prefix`, to every token: [B, N]."""
        state = self.state
        if state.trace is not None:  # one query row against every key, in every head
            width = self.k.shape[1] * self.k.shape[3]
            state.trace.add_overhead("class_attention", state.token_counts() * width)
        scores = ops.class_attention(self.q, self.k, self.bias, self.scale)
        return scores if include_prefix else scores[:, state.prefix :]

    def key_metric(self) -> Tensor:
        """Keys summed over heads: [B, N, d], the similarity metric of token merging (ToMe's mean
        over heads up to a constant factor, which cosine similarity ignores; the sum is one op less)."""
        return self.k.sum(dim=1)


@dataclass(frozen=True)
class RunContext:
    spec: ModelSpec
    parts: nn.Module | None  # the method's learnable modules, if any
    training: bool  # mask mode: differentiable decisions, dense compute


class Method:
    """Base of all methods. Subclasses are frozen dataclasses holding only configuration."""

    def __str__(self) -> str:
        """Short form: the first setting (keep or r), then those that differ from the defaults."""
        if not dataclasses.is_dataclass(self):
            return type(self).__name__
        changed = [f"{f.name}={getattr(self, f.name)!r}" for i, f in enumerate(dataclasses.fields(self))
                   if i == 0 or getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(changed)})"

    @property
    def ragged(self) -> bool:
        """Whether images of one batch may keep different token counts."""
        return False

    @property
    def keeps_positions(self) -> bool:
        """Whether every active token continues one input position (needed by dense mode)."""
        return True

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        """Check the config against the model and build the method's learnable parts."""
        return None

    def before_block(self, layer: int, state: TokenState, ctx: RunContext) -> TokenState:
        return state

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        ctx: RunContext) -> TokenState:
        return state


def check_keep(keep: float, name: str) -> None:
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{name}(keep={keep}): keep is the fraction of tokens kept; use a value in (0, 1]")


def check_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    layers = tuple(sorted(set(int(i) for i in layers)))
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"{name}(layers={layers}): layer {bad[0]} is past this model's {depth} blocks; "
            f"use indices 0..{depth - 1}"
        )
    return layers


def needs_class_token(spec: ModelSpec, name: str) -> None:
    if not spec.has_class_token:
        # Merging cannot serve a model whose output must keep every position.
        instead = "DynamicViT" if spec.dense_only else "ToMe or DynamicViT"
        raise ValueError(f"{name} scores tokens by class-token attention, and {spec.family} has no class "
                         f"token; use {instead} instead")

"""What the executor needs from a model family: its blocks, split into the pieces it calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


class CrossAttentionView(Protocol):
    """A block's attention from its tokens (queries) to another modality's tokens (the memory)."""

    num_heads: int
    head_dim: int
    scale: float
    query_linear_macs: int  # per query token: query and output projections
    memory_linear_macs: int  # per memory token: key and value projections

    def query(self, x: Tensor) -> Tensor:
        """Block state [B, N, C] -> queries [B, H, N, d]."""

    def key_value(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Memory [B, M, Cm] -> keys, values [B, H, M, d]."""

    def branch(self, heads_out: Tensor) -> Tensor:
        """Attention output [B, N, H*d] -> the residual update."""

    def attention_dropout(self) -> float:
        """Dropout on attention weights for the current train/eval mode."""


Step = Literal["attention", "cross_attention", "mlp"]


class BlockView(Protocol):
    """A transformer block seen through the host's own sub-modules: pre-norm with one attention,
    unless it has the optional members below.

    Optional (read with defaults, so pre-norm views need not declare them):
    - `cross_attention: CrossAttentionView | None`: attention to a memory, run between the
      self-attention (and the method's step after it) and the MLP when the call carries a memory.
    - `norm_after(step, x) -> x`: post-norm (BERT-style) blocks, the norm applied to the sum of
      the residual and `step`'s update; `qkv` and `mlp_branch` then take the block state as is.
    """

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

    def attend_rows(self, real: Tensor, rows: Tensor, state: TokenState, eager: bool) -> Tensor:
        """`attend` on a ragged batch's real tokens alone: their block input `real` [T, C], the
        `rows` of the flattened batch they are -> their attention output [T, H*d]."""

    def attention_macs(self, index: Tensor, valid: Tensor | None, map_size: tuple[int, int] | None) -> Tensor:
        """[B] MACs of the attention products (scores, weighted values, positional bias) for the
        tokens at input positions `index` [B, N] (`valid`: which are real)."""


def runs_own_attention(view: BlockView) -> bool:
    """Whether `view` runs attention itself (PositionalAttention)."""
    return callable(getattr(view, "attend", None))


@dataclass
class BlockCall:
    """What a host's block call carries besides its tokens, read once per forward at the first block."""

    key_mask: Tensor | None = None  # [B, N] False on the input's padding, which is never a key
    causal: bool = False  # a token attends only to tokens at earlier or equal input positions
    order: Tensor | None = None  # [B, N] input positions in the order the state holds them
    memory: Tensor | None = None  # [B, M, Cm] the other modality's tokens, cross-attended by every block
    memory_mask: Tensor | None = None  # [B, M] False on the memory's padding


def plain_call(x: Tensor, args: tuple, kwargs: dict, entry: Any) -> BlockCall:
    """A block call of a host that reads no masks: refuse what it would otherwise silently ignore."""
    masks = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if masks or kwargs.get("is_causal"):
        raise ValueError("a patched block of this model takes no attention mask; unpatch the model to run "
                         "masked attention")
    return BlockCall()


ReadCall = Callable[[Tensor, tuple, dict, Any], BlockCall]


@dataclass
class Host:
    """A supported model, resolved: what the executor runs and what FLOP counts need."""

    spec: ModelSpec
    blocks: list[nn.Module]
    views: list[BlockView]
    mean_pooled: bool  # the head averages the patch tokens: merged tokens are weighted by size
    embed_macs_per_patch: int
    head_macs: int  # per sample: layers applied to the pooled features
    # (tokens [B, N, C], block args, block kwargs, what read_entry returned or None) -> BlockCall
    read_call: ReadCall = plain_call
    # A module whose output enters the first block: its forward is wrapped to read from its inputs
    # what the blocks do not see (CLIP's token ids, for the end-of-text position).
    entry: nn.Module | None = None
    read_entry: Callable[[tuple, dict], Any] | None = None
    # Methods of the model that read every block's output as the whole token grid (timm's
    # forward_intermediates): a sparse patch, whose blocks return the kept tokens only, refuses them
    # unless pruning is disabled.
    intermediates: tuple[str, ...] = ()
    # The layers checkpoint themselves inside their own forward (transformers), which a patched
    # block's forward replaces: the Runner then runs each block through `layer_checkpointing`.
    checkpoints_in_layers: bool = False
    # (the patched model) -> whether the model's own loop runs its blocks through reentrant
    # checkpointing as configured now (timm). Such a block runs without recording gradients, so
    # nothing in it trains; read when a call opens in training.
    checkpoints_reentrantly: Callable[[nn.Module], bool] | None = None


def layer_checkpointing(block: nn.Module) -> Callable[..., Tensor] | None:
    """The function transformers runs `block` through when its activation checkpointing is on
    (`activation_checkpointing_enable`), or None. Recent transformers checkpoints inside the layer
    class's forward, which a patched block's forward replaces, so the patch calls it itself; earlier
    5.x releases checkpoint in the layer's `__call__`, around the patched forward, and need nothing."""
    if torch.is_grad_enabled() and block.training and getattr(block, "gradient_checkpointing", False):
        if type(block).__call__ is not nn.Module.__call__:  # the layer's own call checkpoints
            return None
        return getattr(block, "_gradient_checkpointing_func", None)
    return None


def is_reentrant(checkpoint: Callable[..., Tensor]) -> bool:
    """Whether a layer's checkpoint function is set up for reentrant checkpointing. transformers
    binds torch's checkpoint (or a function that calls it) with its keywords in a functools.partial;
    without `use_reentrant` there, torch's own checkpoint defaults to reentrant. Any other function
    is taken as non-reentrant: the executor's check of the block's input still catches it."""
    keywords = getattr(checkpoint, "keywords", None)
    if not isinstance(keywords, dict):
        return False
    torch_default = getattr(checkpoint, "func", None) is torch.utils.checkpoint.checkpoint
    return bool(keywords.get("use_reentrant", torch_default))


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

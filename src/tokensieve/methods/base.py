"""What every method is: a frozen config that scores, selects and reduces tokens at its layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.methods.run import CallInput, MethodRun
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState, Trace


def token_queries(state: TokenState) -> Tensor:
    """[B, N] 1 on the rows whose queries an attention summary counts (`AttentionView.summary`):
    the real tokens, prefix tokens excluded."""
    queries = torch.ones(state.x.shape[:2], dtype=torch.float32, device=state.x.device)
    if state.valid is not None:
        queries = queries * state.valid
    queries[:, : state.prefix] = 0.0
    return queries


@dataclass
class AttentionView:
    """The attention inputs of the block being run, for methods that score tokens from them.

    `exact` is False where the block's attention is not `softmax(q k^T * scale + bias)` over these
    tokens (SAM's windows and relative positions): scores read from attention are refused there.
    A ragged batch's block whose method reads the attention summary attends per sample over its
    real tokens alone: q, k and bias are None there, and `summary` and `heads_out` hold what it read.
    """

    q: Tensor | None  # [B, H, N, d]
    k: Tensor | None  # [B, H, N, d]
    bias: Tensor | None  # mask or additive bias on keys, [B, 1, 1, N] ([B, 1, N, N] when causal)
    scale: float
    state: TokenState
    exact: bool = True
    heads_out: Tensor | None = None  # [B, N, H*d] each head's output, before the output projection
    summary: ops.AttentionSummary | None = None  # what the method reads of the map, when it reads it
    heads: int | None = None  # attention heads, where q and k are None

    @property
    def head_count(self) -> int:
        """The attention's heads (`heads_out` holds their outputs side by side)."""
        return self.heads if self.k is None else self.k.shape[1]

    def class_attention(self) -> Tensor:
        """How much the class token attends to each non-prefix token, mean over heads: [B, N - prefix]."""
        self._require_exact("class attention")
        state = self.state
        if state.trace is not None:  # one query row against every key, in every head
            width = self.k.shape[1] * self.k.shape[3]
            state.trace.add_overhead("class_attention", state.token_counts() * width)
        return ops.class_attention(self.q, self.k, self.bias, self.scale)[:, state.prefix :]

    def received_attention(self) -> Tensor:
        """How much attention each non-prefix token receives: the mean over the real queries of each
        head's attention to it, max over heads, [B, N - prefix]. Costs the whole attention map."""
        self._require_exact("attention received")
        state = self.state
        if state.trace is not None:
            width = self.k.shape[1] * self.k.shape[3]
            state.trace.add_overhead("received_attention", state.token_counts() ** 2 * width)
        weights = ops.attention_weights(self.q, self.k, self.bias, self.scale)  # [B, H, N, N]
        if state.valid is None:
            received = weights.mean(dim=2)
        else:  # padding rows make no queries
            queries = state.valid[:, None, :, None].to(weights.dtype)
            received = (weights * queries).sum(dim=2) / queries.sum(dim=2).clamp_min(1.0)
        return received.amax(dim=1)[:, state.prefix :]

    def key_metric(self) -> Tensor:
        """Keys summed over heads: [B, N, d], the similarity metric of token merging (ToMe's mean
        over heads up to a constant factor, which cosine similarity ignores; the sum is one op less)."""
        self._require_keys("the key metric")
        return self.k.sum(dim=1)

    def _require_keys(self, what: str) -> None:
        if self.q is None:
            raise ValueError(f"this ragged batch's block attended per sample and kept its map's summary, not "
                             f"its q and k, so {what} cannot be read here; read `summary` "
                             "(Method.reads_attention_summary)")

    def _require_exact(self, what: str) -> None:
        self._require_keys(what)
        if not self.exact:
            raise ValueError(f"this layer attends within windows or with relative positions, and {what} "
                             "read from its plain q and k would score an attention that never ran; score "
                             "tokens from their features (as DynamicViT does)")


class Method:
    """Base of all methods. Subclasses are frozen dataclasses holding only configuration, each field
    read into its one type when the method is made (`__post_init__` with `fields.settle`).

    A forward call of a patched module is one run (`MethodRun`): `start` when the call enters the
    first block, then for each block `before_block` and `after_attention`, and `finish` when the
    last block is done. Each step takes and returns the call's TokenState. Learnable parts are
    built by `bind` (per patched module) and `bind_shared` (once, shared by every module patched
    together); per-call inputs are declared by `call_inputs`; `losses` turns what the runs of one
    training step reported into named loss terms.
    """

    # Fields that only change how inference decides, not what training learns: a checkpoint
    # trained with one value loads into the method with another.
    inference_fields: ClassVar[frozenset[str]] = frozenset()

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

    @property
    def uses_grid(self) -> bool:
        """Whether the method works on the full token grid: frozen tokens stay there with their last
        features and a later step may bring them back (`TokenState.activate`)."""
        return False

    @property
    def reads_thresholds(self) -> bool:
        """Whether inference keeps the tokens rated above a threshold per stage, which
        `tokensieve.calibrate` sets (the method then reports `thresholds.StageScores`)."""
        return False

    def threshold_targets(self, spec: ModelSpec) -> dict[int, float]:
        """The blocks whose thresholds calibration sets, in order, each with the share of the
        input's patch tokens its stage aims to keep."""
        raise NotImplementedError(f"{self} keeps no tokens by thresholds")

    def thresholds(self, parts: nn.Module, spec: ModelSpec) -> dict[int, Tensor]:
        """Each stage's threshold in the `parts` the method bound for `spec`, by block: 0-dim
        tensors that calibration writes."""
        raise NotImplementedError(f"{self} keeps no tokens by thresholds")

    def reads_attention_summary(self, layer: int) -> bool:
        """Whether the method reads a summary of block `layer`'s attention map
        (`AttentionView.summary`: the attention each token receives from the patch tokens' queries,
        strongest head, and the class token's row): the block then spells its attention out and
        hands the summary over, instead of the fused kernel, which gives none, and the method
        computing the map again."""
        return False

    def call_inputs(self, spec: ModelSpec) -> tuple[CallInput, ...]:
        """The tensors the method reads from every forward call (`tokensieve.inputs`)."""
        return ()

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        """Check the config against the model and build the method's learnable parts for it."""
        return None

    def bind_shared(self, specs: Sequence[ModelSpec]) -> nn.Module | None:
        """The learnable parts shared by every module patched together (e.g. an image and a text tower)."""
        return None

    def start(self, state: TokenState, run: MethodRun) -> TokenState:
        return state

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        return state

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        run: MethodRun) -> TokenState:
        return state

    def finish(self, state: TokenState, run: MethodRun) -> TokenState:
        return state

    def losses(self, traces: Sequence[Trace]) -> dict[str, Tensor]:
        """Named loss terms, already weighted, from the traces of one training step's forward calls
        (one per patched module and call; `trace.module`, `trace.reports`). `fit` adds them."""
        return {}


def needs_class_token(spec: ModelSpec, name: str) -> None:
    if not spec.has_class_token:
        # Merging cannot serve a model whose output must keep every position.
        instead = "DynamicViT" if spec.dense_only else "ToMe or DynamicViT"
        raise ValueError(f"{name} scores tokens by class-token attention, and {spec.family} has no class "
                         f"token; use {instead} instead")

"""DynamicViT: a small predictor decides which tokens go on, before each pruning block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve import calls, ops
from tokensieve.methods.base import Method, MethodRun
from tokensieve.methods.discard import discard_dropped
from tokensieve.methods.fields import check_layers, flag, layer_indices, settle, share
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState


@dataclass(frozen=True)
class DynamicViT(Method):
    """Before block `layers[s]`, keep keep**(s+1) of the input tokens, chosen by a learned predictor.

    Training (model.train()) runs in mask mode: hard Gumbel-softmax decisions with straight-through
    gradients, pruned tokens masked out as keys. Inference gathers the top-scoring tokens; with
    `dynamic`, each image keeps the tokens its predictor rates above one half (a ragged batch).
    keep=1.0 prunes nothing, in training as in inference: the model runs as the host.

    On a dense host (a map out), the tokens it prunes keep their last features in the map
    (`preserve`, "DynamicViT with preserved tokens"); `preserve=False` leaves their cells empty,
    as its authors' pruning discards them.
    """

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    dynamic: bool = False
    preserve: bool = True

    def __post_init__(self) -> None:
        settle(self, keep=share, layers=layer_indices, dynamic=flag, preserve=flag)

    @property
    def ragged(self) -> bool:
        return self.dynamic

    def bind(self, spec: ModelSpec) -> nn.Module:
        layers = check_layers(self.layers, spec.depth, "DynamicViT")
        return nn.ModuleDict({str(layer): KeepPredictor(spec.dim) for layer in layers})

    def stage_keep(self, layer: int) -> float:
        """keep ** s at the s-th pruning layer (s = 1, 2, ...)."""
        return self.keep ** (sorted(set(self.layers)).index(layer) + 1)

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer not in self.layers or self.keep == 1.0:
            # keep=1.0 prunes nothing in any mode: a mask-mode step would still drop the tokens its
            # sampled decisions reject, and a target of 1.0 leaves the predictor nothing to learn.
            return state
        predictor = run.parts[str(layer)]
        patches = state.x[:, state.prefix :]
        weights = _patch_weights(state)
        logits = predictor(patches, weights)  # [B, Np, 2]: (drop, keep)
        if state.trace is not None:
            state.trace.add_overhead("predictor", predictor.macs(state.patch_counts()))
        if run.training:
            return _mask_mode_step(state, logits, self.stage_keep(layer))
        keep_scores = logits[..., 1] - logits[..., 0]
        if self.dynamic:
            keep_votes = keep_scores > 0
            if weights is not None:
                keep_votes = keep_votes & (weights > 0)
            kept = keep_votes.sum(dim=1).clamp(ops.MIN_KEPT_TOKENS, patches.shape[1])
        else:
            if state.valid is not None:
                raise ValueError("DynamicViT with a fixed keep rate cannot run on a padded batch or follow a "
                                 "ragged selection; use dynamic=True")
            input_patches = state.trace.input_tokens - state.prefix if state.trace else patches.shape[1]
            target = int(input_patches * self.stage_keep(layer))
            kept = max(ops.MIN_KEPT_TOKENS, min(patches.shape[1], target))
            if kept == patches.shape[1]:
                return state
        return state.select(*ops.keep_top(keep_scores, kept, state.prefix, state.patch_valid()))

    def finish(self, state: TokenState, run: MethodRun) -> TokenState:
        return state if self.preserve or self.keep == 1.0 else discard_dropped(state)


def _patch_weights(state: TokenState) -> Tensor | None:
    """[B, Np] weight of each non-prefix token in the predictor's global feature; None: all equal."""
    weights = None if state.keep is None else state.keep[:, state.prefix :]
    if state.valid is not None:
        valid = state.valid[:, state.prefix :].to(state.x.dtype)
        weights = valid if weights is None else weights * valid
    return weights


def _mask_mode_step(state: TokenState, logits: Tensor, target: float) -> TokenState:
    decision = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 1]  # [B, Np], straight-through
    previous = state.keep[:, state.prefix :] if state.keep is not None else 1.0
    patch_keep = decision * previous
    prefix_keep = patch_keep.new_ones(patch_keep.shape[0], state.prefix)
    keep = torch.cat([prefix_keep, patch_keep], dim=1)
    if state.trace is not None:
        state.trace.add_keep_decision(patch_keep, target)
    return state.replace(keep=keep)


class KeepPredictor(nn.Module):
    """Scores each token from its own (local) features and the image's (global) mean feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2),
        )

    def forward(self, tokens: Tensor, weights: Tensor | None) -> Tensor:
        """tokens [B, N, C], weights [B, N] or None (all tokens count) -> logits [B, N, 2] (drop, keep)."""
        norm, embed, activation = self.embed
        features = calls.activate(activation, embed(norm(tokens)))
        half = features.shape[-1] // 2
        local, global_ = features[..., :half], features[..., half:]
        if weights is None:
            pooled = global_.mean(dim=1)
        else:
            pooled = torch.bmm(weights[:, None], global_)[:, 0]
            pooled = pooled / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # The first head layer sees [local, pooled]; the pooled half is the same for every token
        # of an image, so its product is taken once per image and broadcast.
        first = self.head[0]
        hidden = F.linear(local, first.weight[:, :half], first.bias)
        hidden = hidden + F.linear(pooled, first.weight[:, half:])[:, None]
        for layer in self.head[1:]:
            hidden = calls.activate(layer, hidden) if isinstance(layer, nn.GELU) else layer(hidden)
        return hidden

    def macs(self, tokens: int | Tensor) -> int | Tensor:
        """Matrix-product MACs of scoring `tokens` tokens of one image."""
        dim = self.embed[1].in_features
        half = dim // 2
        per_token = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        per_token -= half * self.head[0].out_features  # the pooled half of the first head layer...
        per_image = half * self.head[0].out_features  # ...runs once per image
        return tokens * (per_token + half) + per_image  # + half: the weighted pooling

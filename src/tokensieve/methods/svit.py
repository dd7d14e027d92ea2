"""SViT: a small gate before each late block decides, over the whole token grid, which tokens run it."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve import calls, ops
from tokensieve.fields import choice, real_within
from tokensieve.methods.base import Method, MethodRun
from tokensieve.methods.discard import discard_dropped
from tokensieve.methods.dynamicvit import KeepPredictor
from tokensieve.methods.fields import check_layers, flag, layer_indices, optional, settle, share
from tokensieve.methods.thresholds import INITIAL_THRESHOLD, SCORE_REPORT, StageScores, kept_above, votes
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState, Trace, gather_tokens

GATES = ("mlp", "dynamicvit")
_GATE_CHOICE = choice(GATES, "SViT's two-layer MLP, or DynamicViT's local + global predictor")
TRAIN_DECISIONS = ("gumbel", "thresholds")
_DECISIONS_CHOICE = choice(TRAIN_DECISIONS, "hard Gumbel-softmax samples (the paper), or the thresholds "
                                            "inference keeps tokens above, straight-through")
SCHEDULE_GROUPS = 3  # the gates split into this many equal groups, aiming at keep, keep², keep³
KEEP_REPORT = "svit_keep"  # what a mask-mode call reports for the keep-rate loss: GateKeep per gate


@dataclass(frozen=True)
class SViT(Method):
    """Before each of `layers` (None: every block from depth // 4 on, blocks 3..11 of 12), a gate
    decides for every patch token whether it runs the block; prefix tokens always run.

    The gates aim at keep, keep², keep³ of the input's patch tokens over three equal groups of
    them, in order (`schedule`). A token a gate passes over is frozen: it keeps its features, and
    with `reactivate` (the default) every later gate scores it again with them, so it can come
    back (the state works on the whole token grid). With `reactivate=False` a frozen token stays
    frozen. With `preserve=False` (the paper's "discard" ablation) a pruned token is dropped as
    DynamicViT drops it: never scored again, and gone from the output feature map: its cell of the
    last block's `dense=True` output (and the SAM encoder's, which always runs dense) holds zeros,
    before the host's final norm, instead of the token's last features. It chooses the tokens
    `reactivate=False` chooses; only the map differs.

    Training (model.train()) runs in mask mode: each gate draws a hard Gumbel-softmax decision per
    token (straight-through gradients), pruned tokens are no attention key and pass the block
    unchanged. With `train_decisions="thresholds"` a gate instead keeps, in training too, the
    tokens inference would keep: those rated above its threshold (at least one per image), with
    the keep probability's straight-through gradient. Training then sees the subsets inference
    computes, where Gumbel sampling brings low-rated tokens back now and then. The method's loss
    `keep_rate` is rate_weight · mean over gates of (the batch's kept
    share − the gate's target)²; with `per_image`, each image's share is held to the target (the
    fixed-rate variant). `fit`'s keep-ratio loss leaves these decisions to it.

    Inference is deterministic: each gate keeps the tokens whose keep probability exceeds its
    `threshold` buffer (0.5 until `calibrate` sets it on validation data), at least one per
    image, so images keep their own counts (a ragged batch), each giving what it gives alone. With
    `per_image`, each image keeps its gate's target share of its patch tokens, the best-rated ones
    (equal counts). `gate="dynamicvit"` scores with DynamicViT's local + global predictor instead
    of SViT's MLP. keep=1.0 prunes nothing, in training as in inference.

    With `dither`, each gate first adds to every token's log-odds a fixed offset of its input
    position (`dither_offsets`: logistic, like the noise of a Gumbel decision, but the same on
    every call and spread evenly over the gates at each position). Inference stays deterministic
    and ragged, and a token is kept at about the share of gates sampling would keep it at, rather
    than at all of them or none: the subsets the host learned under Gumbel training. It changes
    inference only (`train_decisions="thresholds"` trains on the plain thresholds' subsets), so a
    checkpoint trained with either value loads into the other (`inference_fields`).

    `sampled=True` reproduces its authors' test-time practice, for comparison: inference draws
    the gates' decisions as training does (Gumbel noise, mask mode), so it saves no compute and
    its output depends on the random state.
    """

    keep: float = 0.7
    layers: tuple[int, ...] | None = None
    per_image: bool = False
    reactivate: bool = True
    preserve: bool = True
    gate: str = "mlp"
    rate_weight: float = 4.0
    sampled: bool = False
    train_decisions: str = "gumbel"
    dither: bool = False

    inference_fields: ClassVar[frozenset[str]] = frozenset({"sampled", "dither"})

    def __post_init__(self) -> None:
        settle(self, keep=share, layers=optional(layer_indices), per_image=flag, reactivate=flag,
               preserve=flag, gate=_GATE_CHOICE, rate_weight=real_within(0.0), sampled=flag,
               train_decisions=_DECISIONS_CHOICE, dither=flag)

    @property
    def ragged(self) -> bool:
        return not self.per_image and not self.sampled

    @property
    def reads_thresholds(self) -> bool:
        return self.ragged and self.keep < 1.0

    def threshold_targets(self, spec: ModelSpec) -> dict[int, float]:
        return self.schedule(spec.depth)

    def thresholds(self, parts: nn.Module, spec: ModelSpec) -> dict[int, Tensor]:
        return {int(name): gate.threshold for name, gate in parts.items()}

    @property
    def uses_grid(self) -> bool:
        return self._reactivates and self.keep < 1.0

    @property
    def _reactivates(self) -> bool:
        return self.reactivate and self.preserve

    def schedule(self, depth: int) -> dict[int, float]:
        """The gated blocks of a model `depth` blocks deep, in order, each with the share of the
        input's patch tokens its gate aims to keep."""
        layers = tuple(range(depth // 4, depth)) if self.layers is None else self.layers
        check_layers(layers, depth, "SViT")
        groups = [SCHEDULE_GROUPS * j // len(layers) for j in range(len(layers))]  # 9 gates: 0, 0, 0, 1, ...
        return {layer: self.keep ** (1 + group) for layer, group in zip(layers, groups, strict=True)}

    def bind(self, spec: ModelSpec) -> nn.ModuleDict:
        make = MlpGate if self.gate == "mlp" else PredictorGate
        return nn.ModuleDict({str(layer): make(spec.dim) for layer in self.schedule(spec.depth)})

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if self.keep == 1.0 or str(layer) not in run.parts:
            return state
        gate = run.parts[str(layer)]
        target = self.schedule(run.spec.depth)[layer]
        if run.training or self.sampled:
            return self._sample(state, run, gate, target)
        if self._reactivates:
            return self._reselect(layer, state, run, gate, target)
        return self._narrow(layer, state, run, gate, target)

    def finish(self, state: TokenState, run: MethodRun) -> TokenState:
        if self.preserve or self.keep == 1.0:
            return state
        return discard_dropped(state)

    def losses(self, traces: Sequence[Trace]) -> dict[str, Tensor]:
        gates = [gate for trace in traces for gate in trace.reports.get(KEEP_REPORT, ())]
        if not gates or self.rate_weight == 0.0:
            return {}
        gaps = torch.stack([gate.squared_gap(self.per_image) for gate in gates])
        return {"keep_rate": self.rate_weight * gaps.mean()}

    def _sample(self, state: TokenState, run: MethodRun, gate: nn.Module, target: float) -> TokenState:
        """Mask mode: a hard decision per token, Gumbel-softmax or thresholded (`train_decisions`;
        sampled inference always draws); every token is a candidate again unless frozen tokens
        stay frozen."""
        patches = state.x[:, state.prefix :]
        valid = state.patch_valid()
        previous = None if state.keep is None or self._reactivates else state.keep[:, state.prefix :]
        logits = gate(patches, _pool_weights(valid, previous, patches.dtype))  # [B, Np, 2]: (drop, keep)
        run.trace.add_overhead("gate", gate.macs(state.patch_counts()))
        if self.train_decisions == "gumbel" or not run.training:
            decision = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 1]  # [B, Np], straight-through
        else:
            candidates = None if previous is None else previous.detach() > 0.5
            if valid is not None:
                candidates = valid if candidates is None else candidates & valid
            decision = _thresholded(logits, gate, candidates)
        patch_keep = decision if previous is None else decision * previous
        keep = torch.cat([patch_keep.new_ones(patch_keep.shape[0], state.prefix), patch_keep], dim=1)
        run.trace.add_keep_decision(patch_keep, target, ratio_loss=False)  # the method weighs it itself
        run.append_report(KEEP_REPORT, GateKeep(patch_keep, valid, target))
        return state.replace(keep=keep)

    def _reselect(self, layer: int, state: TokenState, run: MethodRun, gate: nn.Module,
                  target: float) -> TokenState:
        """Inference with reactivation: score every patch token of the grid, frozen ones with the
        features they were frozen with, and make the chosen ones the active set."""
        # The grid [B, N0 + 1, C]: each position's last features. Written back once: the dense
        # block output may have written these tokens already, and `activate` reads them from here.
        state = state.write_back()
        positions, leading = _patch_positions(state, run)  # [B, M] in input order
        features = state.grid[:, state.prefix : -1] if leading else gather_tokens(state.grid, positions)
        input_valid = run.trace.input_valid
        real = None if input_valid is None else input_valid.gather(1, positions)  # not the input's padding
        available = positions.shape[1] if real is None else real.sum(dim=1)
        logits = gate(features, None if real is None else real.to(features.dtype))
        run.trace.add_overhead("gate", gate.macs(available))
        scores = self._dithered(logits[..., 1] - logits[..., 0], layer, positions, run)  # [B, M]
        run.append_report(SCORE_REPORT, StageScores(layer, scores, real, available))
        slots, valid = self._choose(scores, real, gate, target, available)
        active = torch.cat([state.index[:, : state.prefix], positions.gather(1, slots)], dim=1)
        if valid is not None:
            valid = torch.cat([valid.new_ones(valid.shape[0], state.prefix), valid], dim=1)
        return state.activate(active, valid)

    def _narrow(self, layer: int, state: TokenState, run: MethodRun, gate: nn.Module,
                target: float) -> TokenState:
        """Inference without reactivation: only the active tokens are candidates; the others are
        dropped for good."""
        patches = state.x[:, state.prefix :]
        valid = state.patch_valid()
        logits = gate(patches, None if valid is None else valid.to(patches.dtype))
        current = state.patch_counts()
        run.trace.add_overhead("gate", gate.macs(current))
        scores = self._dithered(logits[..., 1] - logits[..., 0], layer, state.index[:, state.prefix :], run)
        inputs = _input_patches(state, run)
        run.append_report(SCORE_REPORT, StageScores(layer, scores, valid, inputs))
        kept = self._kept_counts(scores, valid, gate, target, inputs, current)
        if not ops.prunes(current, kept):
            return state
        return state.select(*ops.keep_top(scores, kept, state.prefix, valid))

    def _dithered(self, scores: Tensor, layer: int, positions: Tensor, run: MethodRun) -> Tensor:
        """`scores` [B, M] (log-odds of keeping the tokens at input `positions`), with `dither` plus
        each position's fixed offset at this gate."""
        if not self.dither:
            return scores
        rank = sorted(int(name) for name in run.parts).index(layer)
        offsets = _offsets(rank, run.trace.input_tokens + 1, scores.device, scores.dtype)  # + the sink row
        return scores + offsets[positions]

    def _choose(self, scores: Tensor, candidates: Tensor | None, gate: nn.Module, target: float,
                available: int | Tensor) -> tuple[Tensor, Tensor | None]:
        """The slots [B, K] of the scored tokens each image keeps, in order, and their validity
        (None: no padding). Those rated above the threshold are the top-rated ones at their count,
        read off the votes without ranking; keep_top ranks when an image has too few (or `per_image`)."""
        if not self.per_image:
            return kept_above(scores, candidates, gate.threshold)
        counts = self._kept_counts(scores, candidates, gate, target, available, available)
        return ops.keep_top(scores, counts, 0, candidates)

    def _kept_counts(self, scores: Tensor, candidates: Tensor | None, gate: nn.Module, target: float,
                     inputs: int | Tensor, available: int | Tensor) -> int | Tensor:
        """How many tokens each image keeps: the target share of its input patch tokens with
        `per_image`, else those rated above the gate's threshold; at least MIN_KEPT_TOKENS, at most
        the `available` candidates."""
        if self.per_image:
            return _at_most(ops.keep_count(inputs, target), available)
        above = votes(scores, candidates, gate.threshold)
        return _at_most(above.sum(dim=1).clamp_min(ops.MIN_KEPT_TOKENS), available)


@dataclass(frozen=True)
class GateKeep:
    """One gate's mask-mode decisions, for the keep-rate loss."""

    keep: Tensor  # [B, Np] 1/0 per non-prefix token, carrying the straight-through gradient
    valid: Tensor | None  # [B, Np] False on padding (padded text); None: none
    target: float  # the share of patch tokens the gate aims to keep

    def squared_gap(self, per_image: bool) -> Tensor:
        """(kept share − target)², the share taken over the batch, or per image and averaged."""
        weights = torch.ones_like(self.keep) if self.valid is None else self.valid.to(self.keep.dtype)
        kept, tokens = (self.keep * weights).sum(dim=1), weights.sum(dim=1)
        if per_image:
            return (kept / tokens.clamp_min(1.0) - self.target).pow(2).mean()
        return (kept.sum() / tokens.sum().clamp_min(1.0) - self.target).pow(2)


class MlpGate(nn.Module):
    """SViT's gate: LayerNorm, Linear(C, C/4), GELU, Linear(C/4, 2) on each token alone, giving
    (drop, keep) logits; `threshold` is the keep probability inference keeps tokens above."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(1, dim // 4)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, hidden)
        self.activation = nn.GELU()
        self.out = nn.Linear(hidden, 2)
        self.register_buffer("threshold", torch.tensor(INITIAL_THRESHOLD))

    def forward(self, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
        """tokens [B, N, C] -> logits [B, N, 2]; `weights` is ignored (each token is scored alone)."""
        return self.out(calls.activate(self.activation, self.hidden(self.norm(tokens))))

    def macs(self, tokens: int | Tensor) -> int | Tensor:
        """Matrix-product MACs of scoring `tokens` tokens of one image."""
        return tokens * (self.hidden.in_features * self.hidden.out_features
                         + self.out.in_features * self.out.out_features)


class PredictorGate(KeepPredictor):
    """DynamicViT's local + global predictor as an SViT gate, with its `threshold`."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("threshold", torch.tensor(INITIAL_THRESHOLD))


DITHER_SEED = 0
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def dither_offsets(rank: int, tokens: int) -> Tensor:
    """[tokens] the logistic offsets gate number `rank` adds to the log-odds of the tokens at each
    input position: logit(u), u = frac(r + rank · golden ratio), r uniform per position from a fixed
    seed. Over the gates each position's u runs through [0, 1) evenly, so a token the gate rates at
    probability p is kept at about a share p of the gates, as Gumbel sampling keeps it on average."""
    return _offsets(rank, tokens).clone()


@functools.lru_cache(maxsize=64)
def _offsets(rank: int, tokens: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
             ) -> Tensor:
    """`dither_offsets` on `device` in `dtype`, made once per gate, token count, device and dtype
    (no copy to the device in the forward); never written to."""
    generator = torch.Generator().manual_seed(DITHER_SEED)
    start = torch.rand(tokens, generator=generator, dtype=torch.float64)
    share = torch.remainder(start + rank * GOLDEN, 1.0).clamp(1e-6, 1 - 1e-6)
    return torch.logit(share).to(device, dtype)


def _thresholded(logits: Tensor, gate: nn.Module, candidates: Tensor | None) -> Tensor:
    """[B, Np] 1 where a token is rated above the gate's threshold (the best-rated candidate when
    none is), 0 elsewhere, carrying the keep probability's straight-through gradient."""
    scores = logits[..., 1] - logits[..., 0]
    above = votes(scores.detach(), candidates, gate.threshold)
    ranked = scores.detach() if candidates is None else scores.detach().masked_fill(~candidates, -math.inf)
    best = F.one_hot(ranked.argmax(dim=1), scores.shape[1]).bool()
    above = above | (best & ~above.any(dim=1, keepdim=True))
    probability = logits.softmax(dim=-1)[..., 1]
    return above.to(probability.dtype) + probability - probability.detach()


def _patch_positions(state: TokenState, run: MethodRun) -> tuple[Tensor, bool]:
    """`_find_patch_positions`, found once per call: the prefix's positions never change."""
    found = run.scratch.get(_POSITIONS)
    if found is None:
        found = run.scratch[_POSITIONS] = _find_patch_positions(state)
    return found


_POSITIONS = "svit_patch_positions"  # the call's scratch: what _find_patch_positions found


def _find_patch_positions(state: TokenState) -> tuple[Tensor, bool]:
    """The input positions [B, M] of every non-prefix token of the grid, ascending, and whether
    they are the grid's rows prefix..N0-1 (the prefix leads the input, as in every image tower)."""
    batch, tokens, prefix = state.x.shape[0], state.grid.shape[1] - 1, state.prefix
    device = state.index.device
    prefix_positions = state.index[:, :prefix]
    if bool((prefix_positions == torch.arange(prefix, device=device)).all()):
        return torch.arange(prefix, tokens, device=device).expand(batch, -1), True
    # A host that reorders its tokens (CLIP text keeps its end token first): sort the prefix last.
    is_prefix = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    is_prefix.scatter_(1, prefix_positions, True)
    order = (torch.arange(tokens, device=device) + tokens * is_prefix).argsort(dim=1)
    return order[:, : tokens - prefix], False


def _input_patches(state: TokenState, run: MethodRun) -> int | Tensor:
    """The input's non-prefix tokens, per image: an int, or [B] when the input has padding."""
    if run.trace.input_valid is None:
        return run.trace.input_tokens - state.prefix
    return run.trace.input_valid.sum(dim=1) - state.prefix


def _pool_weights(valid: Tensor | None, keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, Np] weight of each token in a DynamicViT gate's global feature: the candidates; None: all."""
    weights = keep
    if valid is not None:
        valid = valid.to(dtype)
        weights = valid if weights is None else weights * valid
    return weights


def _at_most(counts: int | Tensor, limit: int | Tensor) -> int | Tensor:
    if isinstance(counts, Tensor):
        return counts.clamp_max(limit) if isinstance(limit, int) else torch.minimum(counts, limit)
    return limit.clamp_max(counts) if isinstance(limit, Tensor) else min(counts, limit)


__all__ = ["GateKeep", "MlpGate", "PredictorGate", "SViT"]

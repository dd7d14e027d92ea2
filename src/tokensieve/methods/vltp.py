"""VLTP: a pruning decoder rates the mid-encoder map's cells by their relevance to a task, given
the task's guidance; only the relevant ones run the later blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.fields import is_real, not_a_string, real_within, whole_from
from tokensieve.methods.base import Method, MethodRun
from tokensieve.methods.fields import check_layers, flag, layer_indices, optional, settle, share
from tokensieve.methods.run import CallInput
from tokensieve.methods.thresholds import SCORE_REPORT, StageScores, StageThresholds, kept_above
from tokensieve.methods.vltp_decoder import PruningDecoder
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState, Trace

GUIDANCE = "guidance"  # the per-call input: the task's embedding, [B, D] or [B, T, D]
TARGET = "target_mask"  # the optional per-call input of training: the task's mask, [B, H, W]
RELEVANCE_REPORT = "vltp_relevance"  # what each stage reports for the relevance loss: StageRelevance


@dataclass(frozen=True)
class VLTP(Method):
    """Before each of `layers` (a stage; None: every global-attention block of a SAM encoder that
    has blocks after it, e.g. 2, 5 and 8 of ViT-B's 12), a pruning decoder reads the whole map,
    each cell with its latest features, and the call's guidance (`tokensieve.inputs(model,
    guidance=g)`, g [B, guidance_width] or [B, T, guidance_width]: a sentence's embedding, an
    MLLM's `<SEG>` state), and rates each cell's relevance to the task. The stage keeps its share
    `keep` of the input's cells, the most relevant ones (a share per stage, or one for all); the
    others are frozen: they skip the blocks and keep their features in the map, which the neck and
    mask decoder read whole. Every stage rates every cell again, so a frozen one can come back.

    One decoder serves every stage (`shared`, as the authors' code suggests), or each stage has
    its own. The decoder is `width` wide with `heads` heads and `decoder_layers` two-way layers.

    Training (model.train()) runs in mask mode: each stage keeps the same top-rated cells as in
    inference, with the relevance's straight-through gradient, and the frozen cells are no key
    and pass the block unchanged, so the task's loss reaches the decoder through the pruned
    forward. Given the task's mask as the per-call input `target_mask` ([B, H, W], any size), the
    method's loss `relevance` is relevance_weight · the binary cross-entropy of each stage's
    logits against the share of each cell the mask covers. keep=1.0 prunes nothing.

    With `by_threshold`, inference keeps at each stage the cells rated above the stage's threshold
    instead of a fixed share: each image as many as its task needs (at least one), so a batch is
    ragged. `tokensieve.calibrate` sets the thresholds on validation data, to the keep shares over
    all of it or to a MACs budget, and they are stored with the decoder. Training is the same
    either way (top-k at `keep`), so a decoder trained without thresholds serves with them.
    """

    keep: float | tuple[float, ...] = 0.5
    layers: tuple[int, ...] | None = None
    guidance_width: int | None = None
    width: int = 256
    heads: int = 8
    decoder_layers: int = 2
    shared: bool = True
    relevance_weight: float = 1.0
    by_threshold: bool = False

    def __post_init__(self) -> None:
        settle(self, keep=_shares, layers=optional(layer_indices), guidance_width=optional(whole_from(1)),
               width=whole_from(2), heads=whole_from(1), decoder_layers=whole_from(1), shared=flag,
               relevance_weight=real_within(0.0), by_threshold=flag)
        if isinstance(self.keep, tuple) and self.layers is not None and len(self.keep) != len(self.layers):
            raise ValueError(f"VLTP has {len(self.layers)} stages and {len(self.keep)} keep shares; give one "
                             "share per stage, or one for all")

    @property
    def uses_grid(self) -> bool:
        return True

    @property
    def ragged(self) -> bool:
        return self.by_threshold

    @property
    def reads_thresholds(self) -> bool:
        return self.by_threshold and not _keeps_all(self.keep)

    def threshold_targets(self, spec: ModelSpec) -> dict[int, float]:
        return self.stages(spec)

    def thresholds(self, parts: nn.Module, spec: ModelSpec) -> dict[int, Tensor]:
        stored = parts["thresholds"]
        return {layer: stored(stage) for stage, layer in enumerate(self.stages(spec))}

    def call_inputs(self, spec: ModelSpec) -> tuple[CallInput, ...]:
        return (CallInput(GUIDANCE, self.guidance_width),
                CallInput(TARGET, shapes=("[B, H, W]",), required=False))

    def stages(self, spec: ModelSpec) -> dict[int, float]:
        """The blocks the decoder scores before, each with the share of the input's cells it keeps."""
        layers = self.layers
        if layers is None:
            layers = tuple(block for block in spec.global_blocks if block < spec.depth - 1)
            if not layers:
                raise ValueError(f"VLTP's default stages are the global-attention blocks of a SAM encoder, "
                                 f"and {spec.family} has none before its last block; give layers=(...)")
        check_layers(layers, spec.depth, "VLTP")
        keeps = self.keep if isinstance(self.keep, tuple) else (self.keep,) * len(layers)
        if len(keeps) != len(layers):
            raise ValueError(f"VLTP has {len(layers)} stages ({layers}) and {len(keeps)} keep shares; give "
                             "one share per stage, or one for all")
        return dict(zip(layers, keeps, strict=True))

    def bind(self, spec: ModelSpec) -> nn.ModuleDict:
        if self.guidance_width is None:
            raise ValueError("VLTP(guidance_width=D): give the width of the guidance each call passes "
                             "(e.g. 256 for a LISA <SEG> projection; the tos reference model sets its own)")
        if spec.prefix or not spec.dense_only:
            raise ValueError(f"VLTP rates the cells of an image encoder's map (SAM's), and {spec.family} "
                             "is not one; use SViT or DynamicViT on it")
        stages = self.stages(spec)

        def decoder() -> PruningDecoder:
            return PruningDecoder(spec.dim, self.guidance_width, self.width, self.heads, self.decoder_layers)

        parts = nn.ModuleDict({"decoder": decoder()} if self.shared
                              else {str(layer): decoder() for layer in stages})
        if self.by_threshold:
            parts["thresholds"] = StageThresholds(len(stages))
        return parts

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        keep = self.stages(run.spec).get(layer)
        if keep is None or _keeps_all(self.keep):
            return state
        if state.map_size is None:
            raise ValueError("VLTP rates the cells of a map: patch SAM's image encoder with dense=True")
        decoder = run.parts["decoder" if self.shared else str(layer)]
        cells = state.map_size[0] * state.map_size[1]
        if not run.training:  # the grid holds every cell's latest features, frozen ones included
            state = state.write_back()
        features = (state.x if run.training else state.grid[:, :-1]).unflatten(1, state.map_size)
        guidance = _guidance_tokens(run.inputs[GUIDANCE])
        logits = decoder(features.to(decoder.query.dtype), guidance.to(decoder.query.dtype)).float()
        run.trace.add_overhead("decoder", decoder.macs(cells, guidance.shape[1]))
        if self.by_threshold and not run.training:
            run.append_report(RELEVANCE_REPORT, StageRelevance(layer, logits, None))
            run.append_report(SCORE_REPORT, StageScores(layer, logits, None, cells))
            threshold = self.thresholds(run.parts, run.spec)[layer]
            return state.activate(*kept_above(logits, None, threshold))
        count = ops.keep_count(cells, keep)
        kept = ops.top_positions(logits, count)  # [B, K], ascending
        if run.training:
            probability = logits.sigmoid()
            hard = torch.zeros_like(probability).scatter_(1, kept, 1.0)
            decision = (hard + probability - probability.detach()).to(state.x.dtype)
            run.trace.add_keep_decision(decision, keep, ratio_loss=False)  # top-k meets its share itself
            target = _target(run.inputs.get(TARGET), state.map_size)
            run.append_report(RELEVANCE_REPORT, StageRelevance(layer, logits, target))
            return state.replace(keep=decision)
        run.append_report(RELEVANCE_REPORT, StageRelevance(layer, logits, None))
        if count == cells and state.tokens == cells:
            return state
        return state.activate(kept)

    def losses(self, traces: Sequence[Trace]) -> dict[str, Tensor]:
        stages = [stage for trace in traces for stage in trace.reports.get(RELEVANCE_REPORT, ())
                  if stage.target is not None]
        if not stages or self.relevance_weight == 0.0:
            return {}
        terms = [F.binary_cross_entropy_with_logits(stage.logits, stage.target) for stage in stages]
        return {"relevance": self.relevance_weight * torch.stack(terms).mean()}


@dataclass(frozen=True)
class StageRelevance:
    """One stage's relevance logits, and in training the cells' target relevance."""

    layer: int
    logits: Tensor  # [B, N] one per cell of the map, row-major
    target: Tensor | None  # [B, N] the share of each cell the task's mask covers; None: not given


def _shares(value: Any, name: str) -> float | tuple[float, ...]:
    """One share in (0, 1], or a tuple of them (one per stage)."""
    if is_real(value):
        return share(value, name)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} is a share in (0, 1] or a tuple of them, one per stage, e.g. {name}=0.5 or "
                        f"{name}=(0.6, 0.4){not_a_string(value)}")
    return tuple(share(item, name) for item in value)


def _keeps_all(keep: float | tuple[float, ...]) -> bool:
    return keep == 1.0 or (isinstance(keep, tuple) and all(item == 1.0 for item in keep))


def _guidance_tokens(guidance: Tensor) -> Tensor:
    """[B, D] or [B, T, D] guidance as tokens [B, T, D]."""
    return guidance[:, None] if guidance.dim() == 2 else guidance


def _target(mask: Tensor | None, map_size: tuple[int, int]) -> Tensor | None:
    """The share [B, N] of each cell of a `map_size` map that `mask` [B, H, W] covers (the mask
    resized to the map by area; sizes that do not divide are interpolated)."""
    if mask is None:
        return None
    cells = F.adaptive_avg_pool2d(mask.detach().float()[:, None], map_size)
    return cells.flatten(1).clamp(0.0, 1.0)


__all__ = ["VLTP", "StageRelevance"]

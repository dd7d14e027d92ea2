"""Keeping the tokens a method rates above a threshold, one threshold per stage, which
`tokensieve.calibrate` sets on validation data (SViT's gates, VLTP with `by_threshold`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensieve import ops

INITIAL_THRESHOLD = 0.5  # keep probability above which an uncalibrated stage keeps a token
SCORE_REPORT = "threshold_scores"  # what an inference call reports for calibration: StageScores per stage


@dataclass(frozen=True)
class StageScores:
    """One stage's inference scores, for calibration."""

    layer: int
    scores: Tensor  # [B, M] log-odds of keeping each scored token
    candidates: Tensor | None  # [B, M] False on the tokens the stage cannot keep; None: it can keep all
    input_patches: int | Tensor  # the input's patch tokens, per image (an int: the same for all)


class StageThresholds(nn.Module):
    """One keep probability per stage, in stage order, stored with the method's parts."""

    def __init__(self, stages: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.full((stages,), INITIAL_THRESHOLD))

    def forward(self, stage: int) -> Tensor:
        """The 0-dim threshold of stage number `stage` (a view: writing it sets the stage's)."""
        return self.values[stage]


def votes(scores: Tensor, candidates: Tensor | None, threshold: Tensor) -> Tensor:
    """[B, M] whether each scored token is rated above `threshold` (a keep probability) and may be
    kept."""
    above = scores.double() > torch.logit(threshold.double())  # logit(0) = -inf keeps every token
    return above if candidates is None else above & candidates


def kept_above(scores: Tensor, candidates: Tensor | None, threshold: Tensor) -> tuple[Tensor, Tensor | None]:
    """The positions [B, K] of the tokens each image keeps, in order, and their validity (None: the
    same count for every image): those rated above `threshold`, at least MIN_KEPT_TOKENS (the
    best-rated) where fewer are. Read off the votes without ranking when every image has enough."""
    marks = votes(scores, candidates, threshold)
    chosen = ops.marked_positions(marks)
    if chosen is not None:
        return chosen
    counts = marks.sum(dim=1).clamp_min(ops.MIN_KEPT_TOKENS)
    if candidates is not None:
        counts = torch.minimum(counts, candidates.sum(dim=1))
    return ops.keep_top(scores, counts, 0, candidates)


__all__ = ["INITIAL_THRESHOLD", "SCORE_REPORT", "StageScores", "StageThresholds", "kept_above", "votes"]

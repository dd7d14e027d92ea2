"""One task's reference model, dense and with each method, scored on the same split."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Dataset

import tokensieve as ts
from tokensieve.methods import Method
from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.patching import image_encoder, patch_reference
from tokensieve.reference.store import load_reference
from tokensieve.tasks import make_dataset
from tokensieve.train import load_trained

FLOPS_SAMPLES = 16  # images whose mean encoder MACs are reported


@dataclass
class Row:
    task: str
    method: str  # "dense", or the method's short form
    metric: str
    score: float
    relative: float  # score / dense score - 1
    gmacs: float  # encoder MACs per image (1e9), mean over FLOPS_SAMPLES test images
    others: dict[str, float] = field(default_factory=dict)  # further scores, e.g. tos's {"cIoU": ...}

    def to_dict(self) -> dict:
        return asdict(self)


def compare(task: str, methods: list[Method], split: str = "test", samples: int | None = None,
            weights: str | os.PathLike | None = None, trained: dict[str, str] | None = None,
            progress: bool = True) -> list[Row]:
    """Score `task`'s reference model dense, then patched with each of `methods`, on `split`
    (`samples` of it; default: all). `trained` maps a method's short form to a training run
    (directory or checkpoint) whose weights are loaded before scoring it."""
    data = make_dataset(task, split, size=samples, image_size=IMAGE_SIZES[task])
    flop_images = _distinct_images(data, FLOPS_SAMPLES)
    rows: list[Row] = []
    for method in [None, *methods]:
        model = load_reference(task, weights)
        name = "dense" if method is None else str(method)
        if method is not None:
            patch_reference(model, method)
            if trained and name in trained:
                load_trained(model, trained[name])
        scores = evaluate(model, task, data, progress=progress)
        score = scores.pop(METRICS[task])
        gmacs = ts.flops(image_encoder(model), flop_images).macs / 1e9
        dense_score = rows[0].score if rows else score
        rows.append(Row(task, name, METRICS[task], score, _relative(score, dense_score), gmacs, scores))
    return rows


def _relative(score: float, dense: float) -> float:
    """score / dense - 1; a dense score of 0 (an untrained model) leaves it undefined (NaN) unless
    the score is 0 too."""
    if dense == 0:
        return 0.0 if score == 0 else math.nan
    return score / dense - 1.0


def _distinct_images(data: Dataset, count: int) -> torch.Tensor:
    """The first `count` different images of a split [count, 3, H, W] (tos pairs each image with
    several sentences: its samples share an `image_index`)."""
    images: dict[int, torch.Tensor] = {}
    for i in range(len(data)):
        sample = data[i]
        images.setdefault(sample.get("image_index", i), sample["image"])
        if len(images) == count:
            break
    return torch.stack(list(images.values()))

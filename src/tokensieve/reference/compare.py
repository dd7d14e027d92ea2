"""One task's reference model, dense and with each method, scored on the same split."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

import tokensieve as ts
from tokensieve.methods import Method
from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import SegmentationViT
from tokensieve.reference.store import load_reference
from tokensieve.reference.training import patch_reference
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

    def to_dict(self) -> dict:
        return asdict(self)


def compare(task: str, methods: list[Method], split: str = "test", samples: int | None = None,
            weights: str | os.PathLike | None = None, trained: dict[str, str] | None = None,
            progress: bool = True) -> list[Row]:
    """Score `task`'s reference model dense, then patched with each of `methods`, on `split`
    (`samples` of it; default: all). `trained` maps a method's short form to a training run
    (directory or checkpoint) whose weights are loaded before scoring it."""
    data = make_dataset(task, split, size=samples)
    flop_images = torch.stack([data[i]["image"] for i in range(min(FLOPS_SAMPLES, len(data)))])
    rows: list[Row] = []
    for method in [None, *methods]:
        model = load_reference(task, weights)
        name = "dense" if method is None else str(method)
        if method is not None:
            patch_reference(model, method)
            if trained and name in trained:
                load_trained(model, trained[name])
        score = evaluate(model, task, data, progress=progress)[METRICS[task]]
        encoder = model.backbone if isinstance(model, SegmentationViT) else model
        gmacs = ts.flops(encoder, flop_images).macs / 1e9
        dense_score = rows[0].score if rows else score
        rows.append(Row(task, name, METRICS[task], score, score / dense_score - 1.0, gmacs))
    return rows

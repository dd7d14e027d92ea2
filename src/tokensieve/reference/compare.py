"""One task's reference model, dense and with each method, scored on the same split."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

import tokensieve as ts
from tokensieve.methods import Method
from tokensieve.methods.vltp import GUIDANCE
from tokensieve.patch import call_input_names
from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.patching import image_encoder, patch_reference, text_encoder
from tokensieve.reference.recipes.batches import VL_TASKS, task_collate
from tokensieve.reference.shipped_methods import METHOD_STATE, load_method, method_name, shipped_method
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
    gmacs: float  # encoder MACs per image (1e9), mean over FLOPS_SAMPLES test images; nlvr, retrieval:
    # both towers' per sample (an image and its text), the sum of `tower_gmacs`
    others: dict[str, float] = field(default_factory=dict)  # further scores, e.g. tos's {"cIoU": ...}
    tower_gmacs: dict[str, float] = field(default_factory=dict)  # nlvr, retrieval: {"vision": …, "text": …}

    def to_dict(self) -> dict:
        return asdict(self)


def compare(task: str, methods: list[Method], split: str = "test", samples: int | None = None,
            weights: str | os.PathLike | None = None, trained: dict[str, str] | None = None,
            progress: bool = True) -> list[Row]:
    """Score `task`'s reference model dense, then patched with each of `methods`, on `split`
    (`samples` of it; default: all). `trained` maps a method's short form to a training run
    (directory or checkpoint) or a directory `save_method` wrote, whose weights are loaded before
    scoring it; without one, a method the package ships trained with exactly these settings
    (`load_method`) is scored as shipped, unless `weights` names other reference weights."""
    data = make_dataset(task, split, size=samples, image_size=IMAGE_SIZES[task])
    rows: list[Row] = []
    for method in [None, *methods]:
        name = "dense" if method is None else str(method)
        model = scored_model(task, method, weights, (trained or {}).get(name))
        rows.append(score_row(model, task, name, data, rows[0].score if rows else None, progress))
    return rows


def score_row(model: torch.nn.Module, task: str, name: str, data: Dataset, dense_score: float | None = None,
              progress: bool = True) -> Row:
    """`model`'s row on `data`: its task score (relative to `dense_score`; None: this is dense) and
    its encoder's MACs per sample (nlvr, retrieval: each tower's, and their sum)."""
    scores = evaluate(model, task, data, progress=progress)
    score = scores.pop(METRICS[task])
    towers = {}
    if task in VL_TASKS:
        towers = {tower: macs / 1e9 for tower, macs in tower_macs(model, task, data).items()}
    gmacs = sum(towers.values()) if towers else encoder_macs(model, data) / 1e9
    relative = _relative(score, score if dense_score is None else dense_score)
    return Row(task, name, METRICS[task], score, relative, gmacs, scores, towers)


def scored_model(task: str, method: Method | None, weights: str | os.PathLike | None = None,
                 run: str | None = None) -> torch.nn.Module:
    """The model a row scores: the reference model, patched with `method` and loaded from its
    training `run` if given (a run directory or checkpoint, or a directory `save_method` wrote),
    else from the package's shipped training of exactly this method (e.g. SViT with its
    fine-tuned host and calibrated thresholds) when the shipped reference weights are scored."""
    if method is not None and run is not None and (Path(run) / METHOD_STATE).is_file():
        model = load_method(task, method_name(method), run)
        held = ts.sieve_of(image_encoder(model)).method
        if held != method:
            raise ValueError(f"{run} holds {held}, not {method}; name the method it holds")
        return model
    as_shipped = method is not None and run is None and weights is None
    shipped = shipped_method(task, method) if as_shipped else None
    if shipped is not None:
        return load_method(task, method_name(method), shipped)
    model = load_reference(task, weights)
    if method is not None:
        patch_reference(model, method)
        if run is not None:
            load_trained(model, run)
    return model


def encoder_macs(model: torch.nn.Module, data: Dataset, count: int = FLOPS_SAMPLES) -> float:
    """The reference model's encoder MACs per image, the mean over the first `count` different
    images of `data`; a guided encoder's (VLTP on tos) over the first `count` samples, each image
    under its sentence's guidance."""
    encoder = image_encoder(model)
    if GUIDANCE not in call_input_names(encoder):
        return ts.flops(encoder, _distinct_images(data, count)).macs
    samples = [data[i] for i in range(min(count, len(data)))]
    with torch.no_grad():
        guidance = model.pruning_guidance_of([sample["text"] for sample in samples])
    with ts.inputs(encoder, guidance=guidance):
        return ts.flops(encoder, torch.stack([sample["image"] for sample in samples])).macs


def tower_macs(model: torch.nn.Module, task: str, data: Dataset, count: int = FLOPS_SAMPLES,
               batch_size: int | None = None) -> dict[str, float]:
    """The MACs per sample (an image and its text) of each tower of the nlvr or retrieval reference
    model, {"vision": …, "text": …}, the mean over the first `count` samples of `data`, in
    forwards of the whole model (BLIP's text encoder cross-attends to the image tokens the vision
    tower kept, so its cost depends on them), in batches of `batch_size` (default: all at once;
    a method whose counts depend on the batch, such as MADTP's `batch_max`, spends what its batch
    size makes it spend)."""
    if task not in VL_TASKS:
        raise ValueError(f"tower MACs are the two-tower tasks' ({', '.join(VL_TASKS)}); {task!r} has one "
                         "encoder")
    samples = [data[i] for i in range(min(count, len(data)))]
    step = batch_size or len(samples)
    towers = {"vision": image_encoder(model), "text": text_encoder(model)}
    totals = dict.fromkeys(towers, 0.0)
    collate = task_collate(task, IMAGE_SIZES[task])
    for start in range(0, len(samples), step):
        inputs, _ = collate(samples[start : start + step])
        reports = ts.tower_flops(model, list(towers.values()), inputs)
        for name, report in zip(towers, reports, strict=True):
            totals[name] += report.macs * len(samples[start : start + step])
    return {name: total / len(samples) for name, total in totals.items()}


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

"""What a recipe phase trains with, for every phase but the nlvr recipe's own (nlvr/phases.py):
its training data, its loss and the part of the model's output the loss reads, and the
validation score that closes it. `train_method` fine-tunes a method with the same task losses."""

from __future__ import annotations

from collections.abc import Callable

import transformers
from torch import Tensor, nn
from torch.utils.data import Dataset

from tokensieve.reference.evaluation import evaluate
from tokensieve.reference.recipes.auxiliary import AttributeHead, with_attributes
from tokensieve.reference.recipes.batches import itc_collate, task_collate, with_attribute_maps
from tokensieve.reference.recipes.definitions import Phase
from tokensieve.tasks import make_dataset
from tokensieve.tasks.matching import MatchingDataset
from tokensieve.tasks.tos import TosConfig, TosImages
from tokensieve.train import (
    contrastive_loss,
    cross_entropy,
    logits_of,
    mask_bce_dice,
    pixel_cross_entropy,
)

VALIDATION_SAMPLES = 500  # a validation subset scored at the end of each phase, in the run's log
# det scores ~0.3 s an image on two threads (Mask R-CNN's heads), so its phases score fewer
TASK_VALIDATION_SAMPLES = {"det": 200}
ITC_TEMPERATURE = 0.07  # BLIP's initial contrastive temperature (fixed here: transformers' BLIP has none)


def phase_objective(task: str, phase: Phase, attributes: bool) -> tuple[Callable, Callable, Callable]:
    """What one recipe phase trains with: (loss, which part of the output it reads, the batcher).
    A "captions" phase is BLIP's image–text contrastive warm-up; with `attributes`, the model is
    wrapped in AttributeHead and the attribute loss joins the phase's own."""
    if phase.data == "captions":
        loss, read, collate = contrastive_loss, itc_logits, itc_collate(phase.image_size)
    else:
        loss, read = task_loss(task), task_logits(task)
        collate = task_collate(task, phase.image_size, images=task == "tos")
    if attributes:
        return with_attributes(loss, read), whole_output, with_attribute_maps(collate)
    return loss, read, collate


def phase_data(task: str, phase: Phase, size: int) -> Dataset:
    """`size` samples of the phase's training data; for tos, `size` images, each with all its
    sentences (TosImages)."""
    if phase.data in ("matching", "captions") and task != "nlvr":
        raise ValueError(f"{phase.data!r} phases warm up the nlvr model, not the {task} model")
    if task == "tos":
        sentences = size * TosConfig().queries_per_image
        return TosImages(make_dataset(task, "train", size=sentences, image_size=phase.image_size))
    if phase.data == "matching":
        return MatchingDataset("train", size=size, image_size=phase.image_size)
    if phase.data == "captions":
        return make_dataset("retrieval", "train", size=size, image_size=phase.image_size)
    return make_dataset(task, "train", size=size, image_size=phase.image_size)


def task_loss(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    return {"cls": cross_entropy, "seg": pixel_cross_entropy, "tos": mask_bce_dice, "nlvr": cross_entropy,
            "retrieval": contrastive_loss, "det": detection_loss}[task]


def task_logits(task: str) -> Callable[[object], Tensor]:
    """Which tensor of the model's output the task loss reads (det: the whole loss dict)."""
    return {"nlvr": itm_logits, "retrieval": contrastive_logits, "det": whole_output}.get(task, logits_of)


def detection_loss(losses: dict[str, Tensor], targets: object = None) -> Tensor:
    """The sum of the losses a torchvision detector returns in training mode (it computes them
    from the targets it was called with): RPN objectness and box, then class, box and mask."""
    return sum(losses.values())


def itm_logits(output: transformers.utils.ModelOutput) -> Tensor:
    """The logits `fit` trains a BLIP ITM model on: its `itm_score` [B, 2]."""
    return output.itm_score


def itc_logits(output: transformers.utils.ModelOutput) -> Tensor:
    """The logits `fit` trains BLIP's image–text contrast on: with `use_itm_head=False`, BLIP's
    `itm_score` is the cosine similarity [B images, B texts], divided here by ITC_TEMPERATURE."""
    return output.itm_score / ITC_TEMPERATURE


def contrastive_logits(output: transformers.utils.ModelOutput) -> Tensor:
    """The logits `fit` trains CLIP on: `logits_per_image` [B images, B texts], already scaled."""
    return output.logits_per_image


def whole_output(output: object) -> object:
    """For losses that read the whole output of a training wrapper."""
    return output


def validation(task: str, image_size: int) -> Callable[[nn.Module], dict[str, float]]:
    """The score that closes a phase: `evaluate` on VALIDATION_SAMPLES validation samples (det:
    TASK_VALIDATION_SAMPLES), of the model inside its AttributeHead if it has one."""

    def score(model: nn.Module) -> dict[str, float]:
        if isinstance(model, AttributeHead):
            model = model.model
        size = TASK_VALIDATION_SAMPLES.get(task, VALIDATION_SAMPLES)
        data = make_dataset(task, "val", size=size, image_size=image_size)
        return evaluate(model, task, data, progress=False)

    return score

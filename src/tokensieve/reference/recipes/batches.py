"""How the recipes batch a task's samples for `fit`: the model's keyword inputs and the loss's
targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokensieve.reference.models import IMAGE_SIZE, IMAGE_SIZES
from tokensieve.reference.vl import text_inputs
from tokensieve.tasks import collate as collate_samples

VL_TASKS = ("nlvr", "retrieval")


def task_collate(task: str, image_size: int, images: bool = False) -> Callable[[list[dict]], tuple]:
    """Keyword inputs and the task's targets of a batch; with `images`, the samples are TosImages
    items, each image with all its sentences."""
    if images:
        return _tos_images_collate
    if task in VL_TASKS:
        return _vl_collate(task, image_size)
    if task == "det":
        return _det_collate
    return _image_collate(task, image_size)


def with_attribute_maps(collate: Callable[[list[dict]], tuple]) -> Callable[[list[dict]], tuple]:
    """`collate` with targets {"task": its targets, "attributes": the samples' colour×shape maps}."""

    def with_maps(samples: list[dict]) -> tuple[dict, dict]:
        inputs, targets = collate(samples)
        return inputs, {"task": targets, "attributes": torch.stack([s["attributes"] for s in samples])}

    return with_maps


def itc_collate(image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    """Retrieval captions for BLIP's contrastive head: the retrieval batch, run with
    `use_itm_head=False` (image i matches caption i)."""
    retrieval = _vl_collate("retrieval", image_size)

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        inputs, targets = retrieval(samples)
        return {**inputs, "use_itm_head": False}, targets

    return collate


def _image_collate(task: str, image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    target = "label" if task == "cls" else "mask"

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        inputs = {"pixel_values": torch.stack([s["image"] for s in samples])}
        if task == "cls" and image_size != IMAGE_SIZE:
            inputs["interpolate_pos_encoding"] = True
        if task == "tos":
            inputs["text"] = [s["text"] for s in samples]
        return inputs, torch.stack([torch.as_tensor(s[target]) for s in samples])

    return collate


def _det_collate(samples: list[dict]) -> tuple[dict, None]:
    """A torchvision detector's inputs: its images and, in training mode, their targets, from
    which it computes its own losses (so the loss's targets are None)."""
    return {"images": [s["image"] for s in samples], "targets": [s["target"] for s in samples]}, None


def _tos_images_collate(items: list[dict]) -> tuple[dict, Tensor]:
    """Images once, every sentence of each with `image_of` naming its image; the targets are the
    sentences' masks [T, H, W]."""
    counts = torch.tensor([len(item["texts"]) for item in items])
    inputs = {"pixel_values": torch.stack([item["image"] for item in items]),
              "text": [text for item in items for text in item["texts"]],
              "image_of": torch.arange(len(items)).repeat_interleave(counts)}
    return inputs, torch.cat([item["masks"] for item in items])


def _vl_collate(task: str, image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    """Keyword inputs of BLIP and CLIP (images, the models' text ids and mask) and the targets: the
    labels for nlvr; for retrieval, image i's caption is text i of the batch."""

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        batch = collate_samples(samples)
        input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
        inputs = {"pixel_values": batch["image"], "input_ids": input_ids, "attention_mask": attention_mask,
                  "interpolate_pos_encoding": image_size != IMAGE_SIZES[task]}
        targets = batch["label"] if task == "nlvr" else torch.arange(len(samples))
        return inputs, targets

    return collate

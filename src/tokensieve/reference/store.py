"""Reference weights on disk: a transformers directory (config.json + model.safetensors, fp16) that
`from_pretrained` reads, plus `head.safetensors` for the seg model's convolutional head."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from tokensieve.reference.models import SegmentationViT

TASKS = ("cls", "seg")
HEAD_FILE = "head.safetensors"


def shipped_weights(task: str) -> Path:
    """The directory of `task`'s weights inside the installed package."""
    _check_task(task)
    return Path(str(resources.files("tokensieve.reference"))) / "weights" / task


def save_reference(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` in fp16 to `directory` (the model itself is not changed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone if isinstance(model, SegmentationViT) else model
    half = _half_copy(backbone)
    half.save_pretrained(directory)
    if isinstance(model, SegmentationViT):
        head = {key: value.detach().to(torch.float16).contiguous()
                for key, value in model.head.state_dict().items()}
        save_file(head, directory / HEAD_FILE, metadata={"format": "pt"})
    return directory


def load_reference(task: str, directory: str | os.PathLike | None = None) -> nn.Module:
    """The reference model of `task` ("cls" or "seg") in fp32 and eval mode, from `directory`
    (default: the weights shipped with tokensieve)."""
    _check_task(task)
    path = Path(directory) if directory is not None else shipped_weights(task)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no reference weights for {task!r} in {path}; train them with "
                                f"`tokensieve train {task}`")
    if task == "cls":
        model = transformers.ViTForImageClassification.from_pretrained(path, dtype=torch.float32)
    else:
        backbone = transformers.ViTModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False)
        model = SegmentationViT(backbone)
        model.head.load_state_dict({k: v.float() for k, v in load_file(path / HEAD_FILE).items()})
    return model.eval()


def _half_copy(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    return copy.deepcopy(model).to(torch.float16)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"no reference model for task {task!r}; choose one of {', '.join(TASKS)}")

"""Reference weights on disk: a transformers directory (config.json + model.safetensors, fp16) that
`from_pretrained` reads, plus `head.safetensors` for the seg model's convolutional head, or, for
tos, `guidance.safetensors` and `guidance.json` for the text encoder and its projection (the
SamModel is the transformers directory; a pretrained MiniLM text encoder is never stored), or, for
det, `detector.safetensors` for everything of the Mask R-CNN around its ViT (the ViTModel is the
transformers directory; the detector's layout is `build_detector`'s). The
nlvr (BlipForImageTextRetrieval) and retrieval (CLIPModel) models are plain transformers
directories, as cls is."""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from tokensieve.reference.detection import build_detector, is_detector
from tokensieve.reference.guidance import build_guidance
from tokensieve.reference.models import SegmentationViT
from tokensieve.reference.tos import TosModel
from tokensieve.reference.vl import cross_attend_kept_image_tokens

TASKS = ("cls", "seg", "tos", "nlvr", "retrieval", "det")
# the reference models that are one transformers class, loaded whole by from_pretrained
_PLAIN: dict[str, type[transformers.PreTrainedModel]] = {
    "cls": transformers.ViTForImageClassification,
    "nlvr": transformers.BlipForImageTextRetrieval,
    "retrieval": transformers.CLIPModel,
}
HEAD_FILE = "head.safetensors"
GUIDANCE_FILE = "guidance.safetensors"  # tos: the text encoder (if trained) and its projection
GUIDANCE_CONFIG = "guidance.json"  # tos: which text encoder, and its settings
DETECTOR_FILE = "detector.safetensors"  # det: the pyramid, RPN and heads around the ViT
_DET_VIT = "backbone.vit."  # where the det model keeps its ViT
# How a directory shows its task: the class its config.json names, and a file only that task writes.
_LAYOUTS: dict[str, tuple[str, str | None]] = {
    **{task: (cls.__name__, None) for task, cls in _PLAIN.items()},
    "seg": ("ViTModel", HEAD_FILE),
    "tos": ("SamModel", GUIDANCE_CONFIG),
    "det": ("ViTModel", DETECTOR_FILE),
}


# Every file a reference directory may hold.
REFERENCE_FILES = ("config.json", "model.safetensors", HEAD_FILE, GUIDANCE_FILE, GUIDANCE_CONFIG,
                   DETECTOR_FILE)


def holds_reference(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a reference model's weights (its config.json)."""
    return (Path(directory) / "config.json").is_file()


def stored_files(directory: str | os.PathLike) -> list[str]:
    """The reference files present in `directory`."""
    return [name for name in REFERENCE_FILES if (Path(directory) / name).is_file()]


def shipped_weights(task: str) -> Path:
    """The directory of `task`'s weights inside the installed package."""
    _check_task(task)
    return Path(str(resources.files("tokensieve.reference"))) / "weights" / task


def save_reference(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` in fp16 to `directory` (the model itself is not changed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TosModel):
        return _save_tos(model, directory)
    if is_detector(model):
        return _save_det(model, directory)
    backbone = model.backbone if isinstance(model, SegmentationViT) else model
    half = _half_copy(backbone)
    half.save_pretrained(directory)
    if isinstance(model, SegmentationViT):
        save_file(_half_state(model.head.state_dict()), directory / HEAD_FILE, metadata={"format": "pt"})
    return directory


def load_reference(task: str, directory: str | os.PathLike | None = None) -> nn.Module:
    """The reference model of `task` (one of TASKS) in fp32 and eval mode, from `directory`
    (default: the weights shipped with tokensieve)."""
    _check_task(task)
    path = Path(directory) if directory is not None else shipped_weights(task)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no reference weights for {task!r} in {path}; train them with "
                                f"`tokensieve train {task}`")
    held = _stored_task(path)
    if held is not None and held != task:
        raise ValueError(f"{path} holds the {held} reference model, not the {task} one; load it with "
                         f"load_reference('{held}', ...), or pass the directory "
                         f"`tokensieve train {task} --out` wrote")
    if task in _PLAIN:
        model = _load_plain(task, path)
    elif task == "tos":
        model = _load_tos(path)
    elif task == "det":
        model = _load_det(path)
    else:
        model = _load_seg(path)
    return model.eval()


def _stored_task(directory: str | os.PathLike) -> str | None:
    """The task whose reference weights `directory` holds, told by the class its config.json names
    and the files beside it; None when that cannot be told."""
    path = Path(directory)
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    for task, (architecture, own_file) in _LAYOUTS.items():
        if architecture in architectures and (own_file is None or (path / own_file).is_file()):
            return task
    return None


def _from_pretrained(cls: type[transformers.PreTrainedModel], path: Path, task: str,
                     **settings: object) -> transformers.PreTrainedModel:
    """`cls` from `path` in fp32, refused when the directory lacks any of its weights (transformers
    would start those from random values and only log a table)."""
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **settings)
    _check_complete(info["missing_keys"], path, task)
    return model


def _check_complete(missing: set[str] | list[str], where: Path, task: str) -> None:
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ValueError(f"{where} lacks {len(names)} weights of the {task} reference model ({shown}); they "
                         f"would start random. Pass the directory `tokensieve train {task} --out` wrote")


def _load_seg(path: Path) -> SegmentationViT:
    if not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {HEAD_FILE}, the seg model's head; pass the directory "
                                "`tokensieve train seg --out` wrote")
    model = SegmentationViT(_from_pretrained(transformers.ViTModel, path, "seg", add_pooling_layer=False))
    head = {key: value.float() for key, value in load_file(path / HEAD_FILE).items()}
    _check_complete(set(model.head.state_dict()) - set(head), path / HEAD_FILE, "seg")
    model.head.load_state_dict(head)
    return model


def _load_plain(task: str, path: Path) -> transformers.PreTrainedModel:
    cls = _PLAIN[task]
    stored = json.loads((path / "config.json").read_text()).get("model_type")
    if stored != cls.config_class.model_type:  # from_pretrained would warn and load random weights
        raise ValueError(f"{path} holds a {stored!r} model, not the {task} reference model "
                         f"({cls.__name__}); pass the directory `tokensieve train {task} --out` wrote")
    model = _from_pretrained(cls, path, task)
    if task == "nlvr":  # as build_nlvr: cross-attention skips a ragged tower's padding
        cross_attend_kept_image_tokens(model)
    return model


def _save_tos(model: TosModel, directory: Path) -> Path:
    _half_copy(model.sam).save_pretrained(directory)
    rest = {key: value for key, value in model.state_dict().items() if not key.startswith("sam.")}
    save_file(_half_state(rest), directory / GUIDANCE_FILE, metadata={"format": "pt"})
    settings = {"text_encoder": model.text.kind, "settings": model.text.settings()}
    (directory / GUIDANCE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def _load_tos(path: Path) -> TosModel:
    if not (path / GUIDANCE_CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds a SAM model but no {GUIDANCE_CONFIG}; it was not written by "
                                "save_reference for tos")
    settings = json.loads((path / GUIDANCE_CONFIG).read_text())
    sam = _from_pretrained(transformers.SamModel, path, "tos")
    model = TosModel(sam, build_guidance(settings["text_encoder"], **settings["settings"]))
    rest = {key: value.float() for key, value in load_file(path / GUIDANCE_FILE).items()}
    own = {key for key in model.state_dict() if not key.startswith("sam.")}
    if set(rest) != own:
        raise ValueError(f"{path / GUIDANCE_FILE} does not fit a {settings['text_encoder']!r} text encoder: "
                         f"missing {sorted(own - set(rest))[:3]}, unexpected {sorted(set(rest) - own)[:3]}")
    model.load_state_dict(rest, strict=False)
    return model


def _save_det(model: nn.Module, directory: Path) -> Path:
    _half_copy(model.backbone.vit).save_pretrained(directory)
    rest = {key: value for key, value in model.state_dict().items() if not key.startswith(_DET_VIT)}
    save_file(_half_state(rest), directory / DETECTOR_FILE, metadata={"format": "pt"})
    return directory


def _load_det(path: Path) -> nn.Module:
    if not (path / DETECTOR_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {DETECTOR_FILE}, the det model's heads; pass the directory "
                                "`tokensieve train det --out` wrote")
    vit = _from_pretrained(transformers.ViTModel, path, "det", add_pooling_layer=False)
    model = build_detector(vit.config, vit.config.image_size)
    model.backbone.vit = vit
    rest = {key: value.float() for key, value in load_file(path / DETECTOR_FILE).items()}
    own = {key for key in model.state_dict() if not key.startswith(_DET_VIT)}
    _check_complete(own - set(rest), path / DETECTOR_FILE, "det")
    if set(rest) - own:
        raise ValueError(f"{path / DETECTOR_FILE} holds weights the det model does not have, e.g. "
                         f"{sorted(set(rest) - own)[:3]}; it was written for another detector layout")
    model.load_state_dict(rest, strict=False)
    return model


def _half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to(torch.float16).contiguous() for key, value in state.items()}


def _half_copy(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    return copy.deepcopy(model).to(torch.float16)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"no reference model for task {task!r}; choose one of {', '.join(TASKS)}")

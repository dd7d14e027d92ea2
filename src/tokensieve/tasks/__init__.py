"""Synthetic benchmark data for token pruning: seeded scenes of small coloured shapes on
cluttered backgrounds, generated on the fly, and the tasks built on them.

    >>> from tokensieve.tasks import make_dataset, collate
    >>> train = make_dataset("tos", "train")
    >>> loader = torch.utils.data.DataLoader(train, batch_size=32, collate_fn=collate, num_workers=2)

Tasks: "cls" (classification), "seg" (semantic segmentation), "tos" (task-oriented
segmentation), "nlvr" and "retrieval" (the two vision-language tasks), "det" (detection and
instance segmentation). Images are float32 [3, H, W] in [0, 1], not normalised. See
docs/tasks.md.
"""

from __future__ import annotations

from tokensieve.tasks.attributes import COLOUR_NAMES, COLOURS, PURPOSES, SHAPES, SIZE_CLASSES
from tokensieve.tasks.batching import collate
from tokensieve.tasks.cls import CLS_CLASSES, CLS_TYPES, ClsConfig, ClsDataset
from tokensieve.tasks.det import DET_CLASSES, DetConfig, DetDataset, instance_targets
from tokensieve.tasks.det_metrics import detection_ap
from tokensieve.tasks.language import PAD_ID, VOCABULARY, tokenize
from tokensieve.tasks.metrics import (
    accuracy,
    ciou,
    class_iou,
    confusion_matrix,
    giou,
    intersection_union,
    mean_iou,
    recall_at_k,
)
from tokensieve.tasks.nlvr import NlvrConfig, NlvrDataset
from tokensieve.tasks.retrieval import RetrievalConfig, RetrievalDataset, retrieval_gallery
from tokensieve.tasks.scenes import Rendering, Scene, SceneObject, render
from tokensieve.tasks.seg import IGNORE_INDEX, SEG_CLASSES, SegConfig, SegDataset
from tokensieve.tasks.splits import DEFAULT_SIZES, SPLITS, SyntheticDataset
from tokensieve.tasks.tos import TosConfig, TosDataset, TosImages

TASKS: dict[str, type[SyntheticDataset]] = {
    "cls": ClsDataset,
    "seg": SegDataset,
    "tos": TosDataset,
    "nlvr": NlvrDataset,
    "retrieval": RetrievalDataset,
    "det": DetDataset,
}


def make_dataset(task: str, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: object | None = None) -> SyntheticDataset:
    """The `split` ("train", "val" or "test") of `task`, `size` samples long (default:
    DEFAULT_SIZES), with images of `image_size` pixels (224; 256 for the SAM-style model) and the
    task's difficulty `config` (default: the task's config class with its defaults)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task](split, size, image_size, config)


__all__ = [
    "CLS_CLASSES",
    "CLS_TYPES",
    "COLOURS",
    "COLOUR_NAMES",
    "DEFAULT_SIZES",
    "DET_CLASSES",
    "IGNORE_INDEX",
    "PAD_ID",
    "PURPOSES",
    "SEG_CLASSES",
    "SHAPES",
    "SIZE_CLASSES",
    "SPLITS",
    "TASKS",
    "VOCABULARY",
    "ClsConfig",
    "ClsDataset",
    "DetConfig",
    "DetDataset",
    "NlvrConfig",
    "NlvrDataset",
    "Rendering",
    "RetrievalConfig",
    "RetrievalDataset",
    "Scene",
    "SceneObject",
    "SegConfig",
    "SegDataset",
    "SyntheticDataset",
    "TosConfig",
    "TosDataset",
    "TosImages",
    "accuracy",
    "ciou",
    "class_iou",
    "collate",
    "confusion_matrix",
    "detection_ap",
    "giou",
    "instance_targets",
    "intersection_union",
    "make_dataset",
    "mean_iou",
    "recall_at_k",
    "render",
    "retrieval_gallery",
    "tokenize",
]

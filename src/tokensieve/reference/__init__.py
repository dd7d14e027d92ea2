"""Reference task models: DeiT-Tiny-sized transformers ViTs (and, for tos, a small transformers SAM
prompted by the task sentence) trained from scratch on the synthetic tasks by a committed recipe,
shipped as fp16 weights, loaded with `from_pretrained`.

    >>> from tokensieve.reference import load_reference, evaluate
    >>> model = load_reference("seg")
    >>> ts.patch(model.backbone, ts.EViT(keep=0.7, fuse=False), dense=True)
    >>> evaluate(model, "seg", make_dataset("seg", "test"))

See docs/reference.md.
"""

from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.guidance import MiniLMGuidance, TextGuidance, WordEncoder, build_guidance
from tokensieve.reference.models import IMAGE_SIZES, SegmentationViT, build_classifier, build_segmenter
from tokensieve.reference.recipes import RECIPES, Phase, Recipe
from tokensieve.reference.store import TASKS, load_reference, save_reference, shipped_weights
from tokensieve.reference.tos import TosModel, TosOutput, build_tos
from tokensieve.reference.training import (
    build_model,
    image_encoder,
    patch_reference,
    train_method,
    train_reference,
)

__all__ = [
    "IMAGE_SIZES",
    "METRICS",
    "RECIPES",
    "TASKS",
    "MiniLMGuidance",
    "Phase",
    "Recipe",
    "SegmentationViT",
    "TextGuidance",
    "TosModel",
    "TosOutput",
    "WordEncoder",
    "build_classifier",
    "build_guidance",
    "build_model",
    "build_segmenter",
    "build_tos",
    "evaluate",
    "image_encoder",
    "load_reference",
    "patch_reference",
    "save_reference",
    "shipped_weights",
    "train_method",
    "train_reference",
]

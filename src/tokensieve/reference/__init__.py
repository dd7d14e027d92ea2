"""Reference task models: DeiT-Tiny-sized transformers ViTs trained from scratch on the synthetic
tasks by a committed recipe, shipped as fp16 weights, loaded with `from_pretrained`.

    >>> from tokensieve.reference import load_reference, evaluate
    >>> model = load_reference("seg")
    >>> ts.patch(model.backbone, ts.EViT(keep=0.7, fuse=False), dense=True)
    >>> evaluate(model, "seg", make_dataset("seg", "test"))

See docs/reference.md.
"""

from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import SegmentationViT, build_classifier, build_segmenter
from tokensieve.reference.recipes import RECIPES, Phase, Recipe
from tokensieve.reference.store import TASKS, load_reference, save_reference, shipped_weights
from tokensieve.reference.training import build_model, patch_reference, train_method, train_reference

__all__ = [
    "METRICS",
    "RECIPES",
    "TASKS",
    "Phase",
    "Recipe",
    "SegmentationViT",
    "build_classifier",
    "build_model",
    "build_segmenter",
    "evaluate",
    "load_reference",
    "patch_reference",
    "save_reference",
    "shipped_weights",
    "train_method",
    "train_reference",
]

"""Reference task models: DeiT-Tiny-sized transformers ViTs (for tos, a small transformers SAM
prompted by the task sentence; for nlvr and retrieval, small transformers BLIP and CLIP models)
trained on the synthetic tasks by a committed recipe (seg from scratch, cls and tos from the seg
backbone), shipped as fp16 weights, loaded with `from_pretrained`.

    >>> from tokensieve.reference import load_reference, evaluate
    >>> model = load_reference("seg")
    >>> ts.patch(model.backbone, ts.EViT(keep=0.7, fuse=False), dense=True)
    >>> evaluate(model, "seg", make_dataset("seg", "test"))
    >>> svit = load_method("seg", "svit")  # the shipped SViT: its fine-tuned host, gates and thresholds

What only training uses (the phases' objectives and batching, the attribute head, the nlvr
recipe's readouts and statement reader) lives in `tokensieve.reference.recipes` and is not
exported here. See docs/reference.md.
"""

from tokensieve.reference.calibration import calibrate_reference
from tokensieve.reference.evaluation import METRICS, evaluate, retrieval_scores
from tokensieve.reference.guidance import MiniLMGuidance, TextGuidance, WordEncoder, build_guidance
from tokensieve.reference.models import IMAGE_SIZES, SegmentationViT, build_classifier, build_segmenter
from tokensieve.reference.patching import image_encoder, patch_reference, text_encoder
from tokensieve.reference.recipes import RECIPES, Phase, Recipe
from tokensieve.reference.shipped_methods import load_method, method_weights, save_method
from tokensieve.reference.store import TASKS, load_reference, save_reference, shipped_weights
from tokensieve.reference.tos import TosModel, TosOutput, build_tos
from tokensieve.reference.training import (
    build_model,
    load_recipe_phase,
    store_trained,
    train_method,
    train_reference,
)
from tokensieve.reference.vl import (
    END_ID,
    START_ID,
    build_nlvr,
    build_retrieval,
    image_embeddings,
    match_logits,
    text_embeddings,
    text_inputs,
)

__all__ = [
    "END_ID",
    "IMAGE_SIZES",
    "METRICS",
    "RECIPES",
    "START_ID",
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
    "build_nlvr",
    "build_retrieval",
    "build_segmenter",
    "build_tos",
    "calibrate_reference",
    "evaluate",
    "image_embeddings",
    "image_encoder",
    "load_method",
    "load_recipe_phase",
    "load_reference",
    "match_logits",
    "method_weights",
    "patch_reference",
    "retrieval_scores",
    "save_method",
    "save_reference",
    "shipped_weights",
    "store_trained",
    "text_embeddings",
    "text_encoder",
    "text_inputs",
    "train_method",
    "train_reference",
]

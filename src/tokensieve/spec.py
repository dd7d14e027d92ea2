"""What a method may know about the model it is attached to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    family: str  # e.g. "timm VisionTransformer", "transformers ViTModel"
    depth: int
    dim: int
    num_heads: int
    head_dim: int
    prefix: int  # protected tokens at the front: CLS, distillation, registers
    has_class_token: bool
    input_tokens: int  # tokens entering the first block at the model's default image size
    image_size: int  # the model's default input side, in pixels
    dense_only: bool = False  # the output feeds a neck that needs every position (SAM): always dense

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
    input_tokens: int  # tokens entering the first block at the default image size (text: the longest input)
    image_size: int  # the model's default input side, in pixels (0 for text towers)
    # The output is read by input position (SAM's neck, CLIP text's end-token pooling): always dense.
    dense_only: bool = False
    # Blocks that attend over the whole map where the others attend within windows (SAM); () for none.
    global_blocks: tuple[int, ...] = ()

"""The tos (task-oriented segmentation) reference model: a small transformers `SamModel` whose
mask decoder is prompted by the task sentence, as LISA prompts SAM with its `<SEG>` token.

    image [B, 3, 256, 256] ─ sam.vision_encoder (windowed + global attention, neck) ─► [B, 128, 16, 16]
    sentences ─ text encoder [B, D] ─ projection ─► guidance [B, 128] ─┐   (a sparse prompt)
    sam.mask_decoder(image embedding + no-mask dense prompt, positions, guidance) ─► logits [B, 1, 64, 64]

The SAM parts are used through their own modules: the vision encoder (and its neck), the prompt
encoder's no-mask embedding and SAM's random Fourier position features, and the mask decoder with
one output mask. Images go in unnormalised, in [0, 1]. Patch `model.sam.vision_encoder` with
`dense=True` to prune it: the neck and the mask decoder need the whole map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tokensieve.methods.vltp import GUIDANCE, TARGET
from tokensieve.patch import call_input_names, inputs
from tokensieve.reference.guidance import TextGuidance, build_guidance

TOS_IMAGE_SIZE = 256
TOS_PATCH_SIZE = 16
PROMPT_WIDTH = 128  # the neck's output, the prompt encoder's and the mask decoder's width
# 256 px / 16 = a 16×16 grid, padded to 18×18 for windows of 6; global attention in layers 3 and 7.
TOS_VISION = dict(hidden_size=192, num_hidden_layers=8, num_attention_heads=3, window_size=6,
                  global_attn_indexes=[3, 7], output_channels=PROMPT_WIDTH, num_pos_feats=PROMPT_WIDTH // 2,
                  image_size=TOS_IMAGE_SIZE, patch_size=TOS_PATCH_SIZE, initializer_range=0.02)
TOS_PROMPT = dict(hidden_size=PROMPT_WIDTH, image_size=TOS_IMAGE_SIZE, patch_size=TOS_PATCH_SIZE)
# One output mask (no multimask tokens) and a slimmer MLP than SAM's 2048.
TOS_DECODER = dict(hidden_size=PROMPT_WIDTH, mlp_dim=4 * PROMPT_WIDTH, num_hidden_layers=2,
                   num_attention_heads=4, num_multimask_outputs=0, iou_head_hidden_dim=PROMPT_WIDTH)
FOURIER_SCALE = 1.0  # SAM's own scale for its random position features (transformers inits hidden/2)


def tos_sam_config() -> transformers.SamConfig:
    return transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(**TOS_VISION),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(**TOS_PROMPT),
        mask_decoder_config=transformers.SamMaskDecoderConfig(**TOS_DECODER),
    )


@dataclass
class TosOutput:
    logits: Tensor  # [B, 1, H/4, W/4] mask logits
    guidance: Tensor  # [B, PROMPT_WIDTH] the projected sentence embedding given to the mask decoder
    # [images, PROMPT_WIDTH, H/16, W/16] the vision encoder's (neck's) output; one per sentence
    # [B, ...] when the encoder's pruning reads the guidance (VLTP)
    image_embeddings: Tensor


class TosModel(nn.Module):
    """A SamModel prompted by text: `model(pixel_values, text=[...])` → TosOutput.

    `guidance(text)` gives the prompt-width guidance vectors on their own (a pruning method such
    as VLTP needs them before the image encoder runs); pass them back as
    `model(pixel_values, guidance=g)`. To ask each image several sentences with one encoder pass,
    give `image_of` [T], the image row of each of the T sentences (`tasks.TosImages` batches).
    When the vision encoder is patched with a method that reads the guidance (VLTP), each
    sentence's image is encoded under that sentence's guidance, so an image asked several
    sentences is encoded once per sentence, never shared; `masks` [B, H, W] (the sentences'
    target masks) reach such a method's training loss too, and are ignored otherwise.
    `pruning_guidance` [B, D] replaces the guidance only that method reads (the mask decoder
    still reads the sentences' own): for ablations such as zeroed or shuffled guidance. With
    `pruning_text` set (a TextGuidance, e.g. the frozen MiniLM), that method reads its embedding
    of the sentences instead, `pruning_width` wide.
    The native size is 256×256; other multiples of 16 interpolate the absolute position
    embeddings (SAM's relative-position tables interpolate themselves), which the training
    recipe uses for its cheaper early phase.
    """

    def __init__(self, sam: transformers.SamModel, text: TextGuidance) -> None:
        super().__init__()
        width = sam.config.prompt_encoder_config.hidden_size
        self.sam = sam
        self.text = text
        self.pruning_text: TextGuidance | None = None
        # LISA's text_hidden_fcs: a 2-layer MLP from the text width to the prompt width.
        self.projection = nn.Sequential(nn.Linear(text.width, width), nn.ReLU(), nn.Linear(width, width))
        # SAM keeps its Fourier position features fixed (a buffer in the original code).
        sam.shared_image_embedding.positional_embedding.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.sam.config.vision_config.image_size

    @property
    def prompt_width(self) -> int:
        return self.sam.config.prompt_encoder_config.hidden_size

    @property
    def pruning_width(self) -> int:
        """The width of what a guided encoder's pruning reads: `pruning_text`'s, or the guidance's."""
        return self.prompt_width if self.pruning_text is None else self.pruning_text.width

    def pruning_guidance_of(self, text: Sequence[str]) -> Tensor:
        """What a guided encoder's pruning reads for these sentences [B, pruning_width]:
        `pruning_text`'s embedding, or the guidance."""
        return self.guidance(text) if self.pruning_text is None else self.pruning_text(text)

    def guidance(self, text: Sequence[str]) -> Tensor:
        """The sentences' guidance vectors [B, prompt width]: text embedding, then projection."""
        return self.projection(self.text(text))

    def forward(self, pixel_values: Tensor, text: Sequence[str] | None = None,
                guidance: Tensor | None = None, image_of: Tensor | None = None,
                masks: Tensor | None = None, pruning_guidance: Tensor | None = None) -> TosOutput:
        if (text is None) == (guidance is None):
            raise ValueError("give the task sentences as text=[...] or their vectors as guidance=...")
        self._check_images(pixel_values)
        if guidance is None:
            guidance = self.guidance(text)
        batch = pixel_values.shape[0] if image_of is None else self._check_image_of(image_of, pixel_values)
        if guidance.shape != (batch, self.prompt_width):
            raise ValueError(f"guidance must be [{batch}, {self.prompt_width}] (one vector per sentence, "
                             f"from model.guidance(text)), got {tuple(guidance.shape)}")
        reads = call_input_names(self.sam.vision_encoder)
        own_text = self.pruning_text is not None and text is not None
        if pruning_guidance is None and own_text and GUIDANCE in reads:
            pruning_guidance = self.pruning_guidance_of(text)
        if pruning_guidance is not None and (GUIDANCE not in reads
                                             or pruning_guidance.shape != (batch, self.pruning_width)):
            raise ValueError(f"pruning_guidance replaces the guidance a guided encoder (VLTP) reads: give it "
                             f"as [{batch}, {self.pruning_width}], to an encoder patched with such a method")
        if GUIDANCE in reads:  # a guided encoder: each (image, sentence) pair has an encoding of its own
            pixels = pixel_values if image_of is None else pixel_values[image_of]
            given = {GUIDANCE: guidance if pruning_guidance is None else pruning_guidance}
            if masks is not None and TARGET in reads:
                given[TARGET] = masks
            with inputs(self.sam.vision_encoder, **given):
                image = encoded = self.image_embeddings(pixels)
        else:
            encoded = self.image_embeddings(pixel_values)  # [images, C, h, w]
            image = encoded if image_of is None else encoded[image_of]  # [B, C, h, w], one per sentence
        rows, cols = image.shape[-2:]
        positions = self.positional_map(rows, cols).expand(batch, -1, -1, -1)
        # the dense prompt SAM's prompt encoder gives when no mask is prompted
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        no_mask = no_mask.expand(batch, -1, rows, cols)
        masks, _ = self.sam.mask_decoder(
            image_embeddings=image, image_positional_embeddings=positions,
            sparse_prompt_embeddings=guidance[:, None, None, :],  # [B, point batch 1, 1 token, C]
            dense_prompt_embeddings=no_mask, multimask_output=False,
        )
        return TosOutput(logits=masks[:, 0], guidance=guidance, image_embeddings=encoded)

    @torch.no_grad()
    def predict(self, pixel_values: Tensor, text: Sequence[str] | None = None,
                guidance: Tensor | None = None, image_of: Tensor | None = None,
                pruning_guidance: Tensor | None = None) -> Tensor:
        """Bool masks [B, H, W] (one per sentence) at the input's resolution (logits upsampled, then > 0)."""
        logits = self(pixel_values, text=text, guidance=guidance, image_of=image_of,
                      pruning_guidance=pruning_guidance).logits
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, 0] > 0

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """The vision encoder's output map [B, C, H/16, W/16]. At the native size this is the
        encoder's own forward (so a patched encoder runs pruned); at other sizes its modules run
        with the absolute position embeddings resized."""
        encoder = self.sam.vision_encoder
        if pixel_values.shape[-1] == self.image_size:
            return encoder(pixel_values).last_hidden_state
        return encode_resized(encoder, pixel_values)

    def positional_map(self, rows: int, cols: int) -> Tensor:
        """SAM's position features [1, C, rows, cols] of the cell centres (normalised to [0, 1]);
        equal to `sam.get_image_wide_positional_embeddings()` at the native size."""
        fourier = self.sam.shared_image_embedding
        weight = fourier.positional_embedding
        y = (torch.arange(rows, device=weight.device, dtype=weight.dtype) + 0.5) / rows
        x = (torch.arange(cols, device=weight.device, dtype=weight.dtype) + 0.5) / cols
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [rows, cols, (x, y)]
        return fourier(grid).permute(2, 0, 1).unsqueeze(0)

    @staticmethod
    def _check_image_of(image_of: Tensor, pixel_values: Tensor) -> int:
        """The sentence count of a valid `image_of`: int64 [T] rows of the image batch."""
        images = pixel_values.shape[0]
        if image_of.dim() != 1 or image_of.dtype != torch.long or image_of.numel() == 0:
            raise ValueError(f"image_of must be int64 [T], the image row of each sentence, got "
                             f"{image_of.dtype} {tuple(image_of.shape)}")
        if bool((image_of < 0).any() or (image_of >= images).any()):
            raise ValueError(f"image_of names rows outside the {images} images")
        return image_of.numel()

    def _check_images(self, pixel_values: Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        patch = self.sam.config.vision_config.patch_size
        if height != width or height % patch:
            raise ValueError(f"images must be square with a side that is a multiple of {patch} "
                             f"(native {self.image_size}), got {height}×{width}")


def encode_resized(encoder: nn.Module, pixel_values: Tensor) -> Tensor:
    """SamVisionEncoder's forward at any multiple of its patch size: its own patch embedding,
    layers and neck, with the absolute position table resized to the grid (transformers' forward
    accepts only the configured size). The recipe's cheap early phase runs this way; pruning is
    meant for the native size, where the encoder's own forward runs."""
    tokens = encoder.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)  # [B, h, w, C]
    if encoder.pos_embed is not None:
        tokens = tokens + _resize_map(encoder.pos_embed, tokens.shape[1:3])
    for layer in encoder.layers:
        tokens = layer(tokens)
    return encoder.neck(tokens)


def _resize_map(table: Tensor, size: tuple[int, int]) -> Tensor:
    """A [1, h, w, C] position table resized to [1, *size, C] (bicubic, as ViTs interpolate)."""
    if tuple(table.shape[1:3]) == tuple(size):
        return table
    resized = F.interpolate(table.permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def build_tos(text: str | TextGuidance = "words", config: transformers.SamConfig | None = None) -> TosModel:
    """A fresh tos model: SAM parts from `config` (default: `tos_sam_config()`) and the text
    encoder `text` ("words", the default trained one; "minilm", the frozen pretrained one; or a
    TextGuidance)."""
    sam = transformers.SamModel(config or tos_sam_config())
    with torch.no_grad():  # SAM's scale for the Fourier features; transformers' default is for loading
        sam.shared_image_embedding.positional_embedding.normal_(std=FOURIER_SCALE)
    guidance = build_guidance(text) if isinstance(text, str) else text
    return TosModel(sam, guidance)

"""The vision-language reference models: a small transformers BLIP with its image–text matching
(ITM) head for nlvr, and a small transformers CLIP for retrieval; nlvr's recipe starts its vision
tower from the seg backbone (reference/transfer.py), retrieval's trains from scratch.

    nlvr       BlipForImageTextRetrieval: ViT vision tower → text encoder cross-attending to every
               image token → itm_head on the first text token → 2 logits (0 false, 1 true)
    retrieval  CLIPModel: ViT vision tower pooled at its class token, causal text tower pooled at
               the end-of-text token, both projected and L2-normalised; cosine × learned scale

Images go in as the tasks make them: [B, 3, 224, 224] in [0, 1], unnormalised (other multiples
of 16 with `interpolate_pos_encoding=True`). Text goes in as the tasks' word ids turned into the
models' ids by `text_inputs`: the 68 task ids are kept as they are (0 is padding for both models)
and two ids are added after them,

    START_ID = 68   BLIP's [ENC] token (read by the ITM head)   CLIP's start-of-text token
    END_ID   = 69   BLIP's [SEP]                                 CLIP's end-of-text token (pooled)

so "there is a red star" becomes `68 <there> <is> <a> <red> <star> 69`, then padding (0).
CLIP's config names END_ID as `eos_token_id` (≠ 2), so the text tower pools the first END_ID
of each row, wherever padding leaves it. Prune `model.vision_model` (both), `model.text_encoder`
(BLIP) or `model.text_model` (CLIP) with `ts.patch`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import tokensieve as ts
from tokensieve.hosts.hf_blip_text import keep_cross_attention_mask
from tokensieve.patch import output_mask
from tokensieve.tasks import PAD_ID, VOCABULARY

VL_IMAGE_SIZE = 224
VL_PATCH_SIZE = 16
START_ID = len(VOCABULARY)  # 68: BLIP's [ENC] / CLIP's start of text
END_ID = START_ID + 1  # 69: BLIP's [SEP] / CLIP's end of text
VL_VOCABULARY = END_ID + 1  # the task words and the two added ids
MAX_TEXT_TOKENS = 64  # retrieval captions have at most ~40 words; nlvr statements 10

# ViT towers the width of DeiT-Tiny (192, 3 heads, MLP ratio 4), fewer layers to fit the recipes;
# GELU (not CLIP's quick GELU) as in the seg backbone the towers start from (reference/transfer.py).
VISION = dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, image_size=VL_IMAGE_SIZE,
              patch_size=VL_PATCH_SIZE, hidden_act="gelu")
NLVR_VISION_LAYERS = 6
NLVR_TEXT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
RETRIEVAL_VISION_LAYERS = 6
RETRIEVAL_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2)
PROJECTION = 128  # the shared image–text embedding width (CLIP's projection_dim, BLIP's ITC width)


def nlvr_config(vision: dict | None = None, text: dict | None = None,
                projection: int = PROJECTION) -> transformers.BlipConfig:
    """The nlvr model's BlipConfig; `vision` and `text` override sizes (tests build tiny ones)."""
    # BlipVisionConfig's default initializer_range (1e-10) is for loading; from scratch it needs 0.02.
    vision_config = transformers.BlipVisionConfig(
        **{**VISION, "num_hidden_layers": NLVR_VISION_LAYERS, "initializer_range": 0.02, **(vision or {})})
    # is_decoder=True is what gives BlipTextLayer its cross-attention; the forward still runs the
    # text bidirectionally (BlipTextModel's is_decoder argument defaults to False).
    text_config = transformers.BlipTextConfig(
        **{**NLVR_TEXT, **(text or {})}, vocab_size=VL_VOCABULARY, max_position_embeddings=MAX_TEXT_TOKENS,
        pad_token_id=PAD_ID, bos_token_id=START_ID, sep_token_id=END_ID, eos_token_id=END_ID,
        is_decoder=True, use_cache=False,
    )
    return transformers.BlipConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                   projection_dim=projection, image_text_hidden_size=projection)


def retrieval_config(vision: dict | None = None, text: dict | None = None,
                     projection: int = PROJECTION) -> transformers.CLIPConfig:
    """The retrieval model's CLIPConfig; `vision` and `text` override sizes."""
    vision_config = transformers.CLIPVisionConfig(
        **{**VISION, "num_hidden_layers": RETRIEVAL_VISION_LAYERS, **(vision or {})},
        projection_dim=projection)
    # eos_token_id = END_ID (not 2): CLIPTextModel pools the first END_ID of each row.
    text_config = transformers.CLIPTextConfig(
        **{**RETRIEVAL_TEXT, **(text or {})}, vocab_size=VL_VOCABULARY,
        max_position_embeddings=MAX_TEXT_TOKENS, pad_token_id=PAD_ID, bos_token_id=START_ID,
        eos_token_id=END_ID, projection_dim=projection,
    )
    return transformers.CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                   projection_dim=projection)


def build_nlvr(config: transformers.BlipConfig | None = None) -> transformers.BlipForImageTextRetrieval:
    """A fresh nlvr model (default: `nlvr_config()`), its text encoder applying the image mask."""
    return cross_attend_kept_image_tokens(transformers.BlipForImageTextRetrieval(config or nlvr_config()))


def cross_attend_kept_image_tokens(model: transformers.BlipForImageTextRetrieval
                                   ) -> transformers.BlipForImageTextRetrieval:
    """Make the nlvr model's text encoder cross-attend only to the image tokens its vision tower
    really returned, in its own forward too (which `fit` trains through): transformers' BLIP
    forward passes an all-ones image mask, and a patched vision tower that keeps a different count
    per image pads its output. Where the forward passes no mask or an all-ones one, a pre-hook
    gives the text encoder the vision tower's last output mask (`tokensieve.patch.output_mask`)
    when it is the shape of the image tokens passed. Idempotent; returns `model`."""
    keep_cross_attention_mask(model.text_encoder)
    if not getattr(model.text_encoder, "_tokensieve_reads_image_mask", False):
        hook = functools.partial(_kept_image_mask, model.vision_model)
        model.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
        model.text_encoder._tokensieve_reads_image_mask = True
    return model


def _kept_image_mask(vision: nn.Module, module: nn.Module, args: tuple,
                     kwargs: dict) -> tuple[tuple, dict] | None:
    memory, given = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
    if memory is None or not ts.is_patched(vision) or (given is not None and not bool(given.all())):
        return None
    mask = output_mask(vision)
    if mask is None or mask.shape != memory.shape[:2]:
        return None
    return args, {**kwargs, "encoder_attention_mask": mask.to(memory.device)}


def build_retrieval(config: transformers.CLIPConfig | None = None) -> transformers.CLIPModel:
    """A fresh retrieval model (default: `retrieval_config()`)."""
    return transformers.CLIPModel(config or retrieval_config())


def text_inputs(tokens: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The tasks' word ids [B, T] (right-padded with PAD_ID, as `collate` gives them) → the models'
    `input_ids` [B, T + 2] (START_ID, the words, END_ID, padding) and `attention_mask` [B, T + 2]
    (int64, 1 on the tokens)."""
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be int64 word ids [B, T], got {tokens.dtype} {tuple(tokens.shape)}")
    real = tokens != PAD_ID if attention_mask is None else attention_mask.bool()
    if bool((tokens[real] >= START_ID).any() or (tokens[real] < 0).any()):
        raise ValueError(f"word ids must lie in [0, {START_ID}) (tokensieve.tasks.VOCABULARY); map text with "
                         "tokensieve.tasks.tokenize")
    lengths = real.sum(dim=1)
    if bool((real != (torch.arange(tokens.shape[1]) < lengths[:, None])).any()):
        raise ValueError("word ids must be right-padded (real words first, then padding), as collate "
                         "pads them")
    if tokens.shape[1] + 2 > MAX_TEXT_TOKENS:
        raise ValueError(f"a text has {tokens.shape[1]} words; the models read at most {MAX_TEXT_TOKENS - 2}")
    batch = tokens.shape[0]
    ids = torch.full((batch, tokens.shape[1] + 2), PAD_ID, dtype=torch.long)
    ids[:, 0] = START_ID
    ids[:, 1:-1] = tokens.masked_fill(~real, PAD_ID)
    ids[torch.arange(batch), lengths + 1] = END_ID
    return ids, (ids != PAD_ID).long()


def match_logits(model: transformers.BlipForImageTextRetrieval, pixel_values: Tensor, input_ids: Tensor,
                 attention_mask: Tensor) -> Tensor:
    """ITM logits [B, 2] (false, true), as `model(...).itm_score`, except that the text encoder
    cross-attends only to the image tokens a patched vision tower really returned: a method
    that keeps a different count per image pads its output, and transformers' BLIP forward
    would attend to that padding (and its unpatched text encoder drops the mask:
    `hosts.hf_blip_text.keep_cross_attention_mask`)."""
    interpolate = pixel_values.shape[-1] != model.config.vision_config.image_size
    vision = model.vision_model
    if not ts.is_patched(model.text_encoder):
        keep_cross_attention_mask(model.text_encoder)
    if ts.is_patched(vision):
        with ts.trace(vision) as traces:
            image = vision(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
        image_mask = traces[-1].output_mask().to(image.device)
    else:
        image = vision(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                              encoder_attention_mask=image_mask).last_hidden_state
    return model.itm_head(text[:, 0])


def image_embeddings(model: transformers.CLIPModel, pixel_values: Tensor) -> Tensor:
    """CLIP's L2-normalised image embeddings [B, projection]."""
    interpolate = pixel_values.shape[-1] != model.config.vision_config.image_size
    features = model.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
    return F.normalize(features.pooler_output, dim=-1)


def text_embeddings(model: transformers.CLIPModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """CLIP's L2-normalised text embeddings [B, projection], pooled at END_ID."""
    features = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(features.pooler_output, dim=-1)


def is_vl_model(model: nn.Module) -> bool:
    return isinstance(model, (transformers.BlipForImageTextRetrieval, transformers.CLIPModel))

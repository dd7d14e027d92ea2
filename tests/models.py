"""Small random-weight hosts and inputs shared by the tests (no network, CPU, fp32)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import tokensieve as ts

IMAGE = 64  # default input side for every small host
PATCH = 8  # 64 patch tokens per image at the default size
DEPTH = 4
PATCHES = (IMAGE // PATCH) ** 2

_TIMM_SMALL = dict(pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=64, depth=DEPTH,
                   num_heads=2, num_classes=10)

# name -> (timm model name, overrides on top of _TIMM_SMALL)
TIMM_HOSTS = {
    "timm-vit": ("vit_tiny_patch16_224", {}),
    "timm-vit-qknorm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "timm-deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "timm-deit3": ("deit3_small_patch16_224", {"init_values": 1e-1}),
    # 4 registers, avg pool, LayerScale (whose default 1e-5 would make every block nearly the identity)
    "timm-reg-gap": ("vit_medium_patch16_reg4_gap_256", {"class_token": True, "init_values": 1e-1}),
}

_HF_SMALL = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=64, num_hidden_layers=DEPTH,
                 num_attention_heads=2, num_labels=10)
_HF_CONFIGS = {
    "ViT": (transformers.ViTConfig, {"intermediate_size": 128}),
    "DeiT": (transformers.DeiTConfig, {"intermediate_size": 128}),
    "Dinov2": (transformers.Dinov2Config, {"mlp_ratio": 2, "layerscale_value": 0.5}),
    "Dinov2WithRegisters": (transformers.Dinov2WithRegistersConfig,
                            {"mlp_ratio": 2, "layerscale_value": 0.5, "num_register_tokens": 4}),
    "CLIPVision": (transformers.CLIPVisionConfig, {"intermediate_size": 128, "projection_dim": 16}),
    "BlipVision": (transformers.BlipVisionConfig, {"intermediate_size": 128, "initializer_range": 0.02}),
}
HF_CLASSES = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "BlipVisionModel",
)

# SAM's image encoder: an 8x8 map, windows of 3 (so the map is padded to 9x9), global attention
# in layers 1 and 3, relative positions, a neck to 16 channels.
SAM_WINDOW = 3
SAM_GLOBAL_LAYERS = (1, 3)
SAM_CHANNELS = 16
_SAM_SMALL = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=DEPTH,
                  num_attention_heads=2, output_channels=SAM_CHANNELS, window_size=SAM_WINDOW,
                  global_attn_indexes=SAM_GLOBAL_LAYERS, use_rel_pos=True,
                  num_pos_feats=SAM_CHANNELS // 2,  # the prompt encoder's point features
                  initializer_range=0.1)  # SAM's default 1e-10 would make every block the identity

_PREFIX_PARAMETERS = ("cls_token", "reg_token", "dist_token", "distillation_token", "register_tokens")


def timm_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A small timm host from TIMM_HOSTS, in eval mode."""
    model_name, extra = TIMM_HOSTS[name]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, **{**_TIMM_SMALL, **extra, **overrides})
    return _finish(model, seed)


def hf_model(class_name: str, seed: int = 0, **overrides) -> nn.Module:
    """A small transformers host of class `class_name`, in eval mode."""
    family = next(f for f in sorted(_HF_CONFIGS, key=len, reverse=True) if class_name.startswith(f))
    config_class, extra = _HF_CONFIGS[family]
    torch.manual_seed(seed)
    config = config_class(**{**_HF_SMALL, **extra, **overrides})
    return _finish(getattr(transformers, class_name)(config), seed)


def host_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """Any host by its test id: a TIMM_HOSTS key, or a transformers class name."""
    if name in TIMM_HOSTS:
        return timm_model(name, seed, **overrides)
    return hf_model(name, seed, **overrides)


def _finish(model: nn.Module, seed: int) -> nn.Module:
    # timm and HF start CLS / register tokens at (near) zero; LayerNorm of a zero vector is zero, which
    # makes class attention uniform and lets a wrong prefix go unnoticed. Give them real values.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in _PREFIX_PARAMETERS:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def sharpen_attention(model: nn.Module, factor: float = 4.0) -> nn.Module:
    """Scale the query/key projections so class attention is peaked and differs between images."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("attn.qkv.", "q_proj.", "k_proj.")):
                param.mul_(factor)
    return model


def strengthen(model: nn.Module, factor: float = 4.0) -> nn.Module:
    """Sharpen attention and scale the MLPs' first layer, so blocks act far from linearly (random
    timm/HF initialisations are so small that merging tokens barely changes a mean-pooled output)."""
    sharpen_attention(model, factor)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.fc1." in name or "mlp.gate_proj." in name or "mlp.up_proj." in name:
                param.mul_(factor)
    return model


def sam_model(class_name: str = "SamVisionEncoder", seed: int = 0, **overrides) -> nn.Module:
    """A small SAM: the image encoder (SamVisionEncoder, SamVisionModel) or the whole SamModel, eval mode."""
    from transformers.models.sam import modeling_sam  # SamVisionEncoder is not exported at the top level

    torch.manual_seed(seed)
    vision = transformers.SamVisionConfig(**{**_SAM_SMALL, **overrides})
    if class_name == "SamModel":
        config = transformers.SamConfig(
            vision_config=vision.to_dict(),
            prompt_encoder_config=dict(hidden_size=SAM_CHANNELS, image_size=IMAGE, patch_size=PATCH),
            mask_decoder_config=dict(hidden_size=SAM_CHANNELS, mlp_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, iou_head_hidden_dim=16),
        )
    else:
        config = vision
    model = getattr(modeling_sam, class_name)(config)
    _randomize_sam_positions(model, seed)
    return model.eval()


def _randomize_sam_positions(model: nn.Module, seed: int) -> None:
    # SAM starts its position tables at zero and transformers zeroes linear biases; a wrong
    # relative position, or a missing padding cell (whose key is the qkv bias), would go unnoticed.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed", "attn.qkv.bias")):
                param.copy_(torch.randn(param.shape, generator=generator))


def images(batch: int, height: int = IMAGE, width: int = IMAGE, seed: int = 0) -> Tensor:
    """A batch of random images, each at its own contrast so that images differ in content."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=generator)
    contrast = torch.logspace(-0.5, 0.5, batch) if batch > 1 else torch.ones(1)
    return x * contrast.view(-1, 1, 1, 1)


def distinct_images(seed: int = 0) -> Tensor:
    """Three 64x64 images of different structure (smooth, noise, coarse blocks), whose class
    attention and predictor scores spread differently, so per-image token counts differ."""
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(1, 3, 4, 4, generator=generator), size=(IMAGE, IMAGE), mode="bilinear")
    noise = torch.randn(1, 3, IMAGE, IMAGE, generator=generator)
    blocks = 3 * F.interpolate(torch.randn(1, 3, 8, 8, generator=generator), size=(IMAGE, IMAGE))
    return torch.cat([smooth, noise, blocks])


def is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def forward(model: nn.Module, x: Tensor, **kwargs) -> dict[str, Tensor]:
    """Every tensor the model returns, by name ("out" for a plain tensor)."""
    if is_hf(model) and x.shape[-2:] != (IMAGE, IMAGE) and "Dinov2" not in type(model).__name__:
        kwargs.setdefault("interpolate_pos_encoding", True)
    with torch.no_grad():
        output = model(x, **kwargs)
    if isinstance(output, Tensor):
        return {"out": output}
    return {key: value for key, value in output.items() if isinstance(value, Tensor)}


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, f"{key}: {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
    return max((a[key] - b[key]).abs().max().item() for key in a)


def calibrate_predictors(model: nn.Module, *inputs, **named_inputs) -> None:
    """Shift each DynamicViT predictor so that about half of the batch's tokens score above zero
    (random predictors keep all or none), so that images keep different counts. The inputs are the
    model's (a batch of images, or named inputs such as input_ids)."""
    sieve = ts.sieve_of(model)
    for predictor in predictors(sieve):
        scores: list[Tensor] = []

        def record(module, inputs, logits, scores=scores):
            weights = inputs[1]  # None when every token counts
            keep_scores = logits[..., 1] - logits[..., 0]
            scores.append(keep_scores.flatten() if weights is None else keep_scores[weights > 0])

        handle = predictor.register_forward_hook(record)
        try:
            with torch.no_grad():
                model(*inputs, **named_inputs)
        finally:
            handle.remove()
        ranked = scores[0].sort().values
        middle = len(ranked) // 2
        with torch.no_grad():  # halfway between two scores: no token on the edge, where rounding decides
            predictor.head[-1].bias[1] -= (ranked[middle - 1] + ranked[middle]) / 2


def predictors(sieve: ts.Sieve) -> list[nn.Module]:
    """The sieve's per-layer predictors, shallowest first (modules that map tokens to 2 logits)."""
    found = [m for m in sieve.modules() if isinstance(getattr(m, "head", None), nn.Sequential)]
    assert found, "expected DynamicViT predictors on the sieve"
    return found


def kept_positions(trace: ts.Trace) -> Tensor:
    """[B] input positions each sample still has active after the last block: its kept tokens, less
    the fused token (EViT's, MADTP's), which stands for no single position."""
    last = trace.layers[-1]
    fused = last.index < 0
    if last.valid is not None:
        fused = fused & last.valid
    return trace.kept_tokens()[-1] - fused.sum(dim=1)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The host's transformer blocks, in order."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return next(list(m) for name, m in model.named_modules()
                if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers"))


def patched_copy(name: str, model: nn.Module, attention: str = "sdpa", **overrides) -> nn.Module:
    """A freshly built host `name` with `model`'s weights, patched with its method and method weights."""
    sieve = ts.sieve_of(model)
    fresh = host_model(name, seed=1, **overrides)
    fresh.load_state_dict(model.state_dict())
    ts.patch(fresh, sieve.method, attention=attention).load_state_dict(sieve.state_dict())
    return fresh


# Text towers: vocabulary of 100, start/end-of-text ids inside it, texts of at most 12 tokens.
TEXT_VOCAB, TEXT_BOS, TEXT_EOS, TEXT_PAD = 100, 98, 99, 0
_TEXT_SMALL = dict(vocab_size=TEXT_VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=16)
_CLIP_TEXT = dict(_TEXT_SMALL, bos_token_id=TEXT_BOS, eos_token_id=TEXT_EOS, pad_token_id=TEXT_PAD,
                  projection_dim=16)
# BlipVisionConfig's default initializer_range (1e-10) would leave the vision tower's weights near zero.
_BLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, initializer_range=0.02)


def clip_text_model(class_name: str = "CLIPTextModel", seed: int = 0, **overrides) -> nn.Module:
    """A small transformers CLIP text tower (or CLIPModel, with a small vision tower), in eval mode."""
    torch.manual_seed(seed)
    text = transformers.CLIPTextConfig(**{**_CLIP_TEXT, **overrides})
    if class_name == "CLIPModel":
        vision = transformers.CLIPVisionConfig(**_BLIP_VISION)
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=16)
        return getattr(transformers, class_name)(config).eval()
    return getattr(transformers, class_name)(text).eval()


def blip_retrieval(seed: int = 0, **text_overrides) -> nn.Module:
    """A small BlipForImageTextRetrieval (text encoder cross-attending to a 48-wide vision tower)."""
    torch.manual_seed(seed)
    text = dict(_TEXT_SMALL, pad_token_id=TEXT_PAD, bos_token_id=TEXT_BOS, sep_token_id=TEXT_EOS,
                **text_overrides)
    config = transformers.BlipConfig(text_config=text, vision_config=_BLIP_VISION)
    return _finish(transformers.BlipForImageTextRetrieval(config), seed)


def texts(lengths: list[int], width: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded token ids [B, width] (start token, random words, end token, then padding) and
    their attention mask [B, width] (1 on tokens)."""
    width = width or max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TEXT_BOS, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 0], ids[i, length - 1], ids[i, length:] = TEXT_BOS, TEXT_EOS, TEXT_PAD
        mask[i, :length] = 1
    return ids, mask

"""transformers CLIP text tower (CLIPTextModel, CLIPTextModelWithProjection, CLIPModel.text_model).

The tower attends causally and pools each text at its end-of-text (EOS) token, wherever padding
puts it, so it runs dense (every position comes back, pruned ones frozen). Two tokens are never
pruned: the EOS token, which the head reads and which alone has seen the whole text, and the
first token, which every later token attends to (the attention sink of causal models). The state
holds the EOS token first: its attention row scores the other tokens for Top-K and EViT, as the
class token does in a vision tower (the first token's causal row sees only itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.hosts.base import BlockCall, Host, linear_macs
from tokensieve.hosts.hf_clip import CLIPLayerView
from tokensieve.spec import ModelSpec

FAMILY = "transformers CLIPTextModel/CLIPTextModelWithProjection"
_MODELS = ("CLIPTextModel", "CLIPTextModelWithProjection")
PROTECTED = 2  # the EOS token (held first) and the text's first token
_LEGACY_EOS_ID = 2  # configs from before transformers PR #24773: the EOS token has the highest id


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ in _MODELS and cls.__module__.startswith("transformers.")


def end_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """[B] position of the token CLIPTextModel pools: the first EOS (the highest id, for legacy configs)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == _LEGACY_EOS_ID:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def state_order(end: Tensor, valid: Tensor | None, tokens: int) -> Tensor:
    """[B, N] input positions in the order the state holds them: the EOS token, then the first real
    token, the other real tokens, and padding last."""
    positions = torch.arange(tokens, device=end.device).expand(end.shape[0], tokens)
    rank = positions + 1  # real tokens keep their order after the EOS token (rank 0)
    if valid is not None:
        rank = rank + tokens * ~valid  # padding after every real token
    rank = rank.masked_fill(positions == end[:, None], 0)
    return rank.argsort(dim=1)


class _TextCall:
    """Reads a CLIPEncoderLayer call of the text tower: (hidden_states, attention_mask, is_causal=True)."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, x: Tensor, args: tuple, kwargs: dict, input_ids: Tensor | None) -> BlockCall:
        mask = args[0] if args else kwargs.get("attention_mask")
        others = [a for a in (*args[1:], *(v for k, v in kwargs.items() if k != "attention_mask"))
                  if isinstance(a, Tensor)]
        if others:
            raise ValueError("a patched CLIP text layer takes only its attention mask")
        batch, tokens, _ = x.shape
        valid = ops.key_mask(mask, tokens, causal=True)
        if input_ids is not None and input_ids.shape == (batch, tokens):
            end = end_positions(input_ids, self.eos_token_id).to(x.device)
        else:  # the tower was entered without token ids: the last real token ends the text
            end = _last_real(valid, batch, tokens, x.device)
        if valid is not None and not bool(valid.gather(1, end[:, None]).all()):  # the host would pool padding
            raise ValueError("the end-of-text token the tower pools (the first eos_token_id; the highest id "
                             "for legacy configs) is padding in a text, ahead of the text itself: pad on the "
                             "right, or pad with an id other than the end-of-text token")
        real = valid.sum(dim=1) if valid is not None else torch.full((batch,), tokens, device=x.device)
        if bool((real < PROTECTED).any()):
            raise ValueError("every text needs a start and an end-of-text token (at least 2 real tokens)")
        return BlockCall(key_mask=valid, causal=True, order=state_order(end, valid, tokens))


def _last_real(valid: Tensor | None, batch: int, tokens: int, device: torch.device) -> Tensor:
    if valid is None:
        return torch.full((batch,), tokens - 1, device=device)
    positions = torch.arange(tokens, device=device)
    return (positions * valid).argmax(dim=1)


def _token_ids(args: tuple, kwargs: dict) -> Any:
    """CLIPTextEmbeddings(input_ids=None, position_ids=None, inputs_embeds=None): its token ids."""
    return kwargs.get("input_ids", args[0] if args else None)


def resolve(model: nn.Module) -> Host:
    tower = getattr(model, "text_model", model)  # the projection model wraps a text model
    layers = list(tower.encoder.layers)
    views = [CLIPLayerView(layer) for layer in layers]
    config = tower.config
    spec = ModelSpec(
        family=f"transformers {type(model).__name__}", depth=len(views), dim=config.hidden_size,
        num_heads=views[0].num_heads, head_dim=views[0].head_dim, prefix=PROTECTED, has_class_token=True,
        input_tokens=config.max_position_embeddings, image_size=0, dense_only=True,
    )
    projection = getattr(model, "text_projection", None)
    return Host(
        spec=spec, blocks=layers, views=views, mean_pooled=False, embed_macs_per_patch=0,
        head_macs=linear_macs(projection) if projection is not None else 0,
        read_call=_TextCall(tower.eos_token_id), entry=tower.embeddings, read_entry=_token_ids,
        checkpoints_in_layers=True,
    )

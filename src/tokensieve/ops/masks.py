"""Attention masks: read a host's mask as key validity, and build the causal mask over kept tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def key_mask(mask: object, keys: int, causal: bool = False) -> Tensor | None:
    """Which keys a host's attention mask lets be attended: [B, keys] bool, or None if every key may.

    Reads the masks transformers hands its layers: None; a 2-D padding mask [B, keys] (1/True on
    tokens); or a 4-D mask [B, 1, Q, keys] that is boolean (True = attend) or additive (0 = attend,
    -inf or the dtype's minimum = do not), made of key padding alone or, with `causal`, of key padding
    and causal order. Any other mask (a real-valued bias, a block or custom pattern, flex attention's
    BlockMask) cannot be expressed as key validity and raises a ValueError.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"cannot read an attention mask of type {type(mask).__name__}; load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    if mask.shape[-1] != keys:
        raise ValueError(f"the attention mask covers {mask.shape[-1]} keys, the sequence has {keys}")
    if mask.dim() == 2:
        valid = _padding_mask(mask)
    elif mask.dim() == 4 and mask.shape[1] == 1:
        valid = _valid_keys_of(_allowed(mask)[:, 0], causal)
    else:
        raise ValueError(f"cannot read an attention mask of shape {tuple(mask.shape)}: expected a padding "
                         "mask [batch, keys] or a mask [batch, 1, queries, keys]")
    return None if bool(valid.all()) else valid


def _padding_mask(mask: Tensor) -> Tensor:
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("a 2-D attention mask must hold 1 on tokens and 0 on padding")
    return mask.bool()


def _allowed(mask: Tensor) -> Tensor:
    """A boolean or additive 4-D mask as True where attention is allowed."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"cannot read an integer 4-D attention mask ({mask.dtype}); give a boolean or "
                         "additive float mask")
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2  # the dtype's minimum, or -inf
    if not bool((allowed | blocked).all()):
        raise ValueError("the attention mask adds values other than 0 and -inf (a bias, e.g. relative "
                         "positions); tokensieve reads only padding and causal masks")
    return allowed


def _valid_keys_of(allowed: Tensor, causal: bool) -> Tensor:
    """Key validity [B, K] of a mask [B, Q, K], checked to be all the mask says."""
    queries, keys = allowed.shape[-2:]
    if causal:
        if queries != keys:
            raise ValueError(f"a causal attention mask must be square, got {queries} x {keys}")
        valid = allowed[:, -1]  # the last query may see every earlier key: its row is the key padding
        order = torch.ones(queries, keys, dtype=torch.bool, device=allowed.device).tril()
        expected = order & valid[:, None, :]
    else:
        valid = allowed.any(dim=1)
        expected = valid[:, None, :].expand_as(allowed)
    if not torch.equal(allowed, expected):
        kind = "causal order and key padding" if causal else "key padding"
        raise ValueError(f"the attention mask is not made of {kind} alone (e.g. a custom or block mask); "
                         "tokensieve cannot prune under it: unpatch the model to run it")
    return valid


def causal_mask(index: Tensor, keys: Tensor | None) -> Tensor:
    """[B, 1, N, N] bool: token i may attend token j if j's input position `index` is not after i's and
    j is a key (`keys` [B, N], None: all are). A row left with no key (padding, or a query before every
    real token) attends to itself alone, so every row stays defined."""
    allowed = index[:, :, None] >= index[:, None, :]
    if keys is not None:
        allowed = allowed & keys[:, None, :]
    empty = ~allowed.any(dim=-1, keepdim=True)
    itself = torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
    return (allowed | (empty & itself))[:, None]

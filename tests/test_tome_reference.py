"""ToMe against a plain implementation: one sample at a time, token lists, no index arithmetic."""

from __future__ import annotations

import pytest
import torch
from models import images, strengthen, timm_model
from torch import Tensor, nn

import tokensieve as ts


def _plain_merge(tokens: Tensor, size: Tensor, keys: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching as the ToMe paper states it, for one sample [N, C]: the whole sequence
    alternates between A (even positions) and B (odd), and the `prefix` tokens, wherever they fall,
    match nothing. The order of the result decides the next block's A/B alternation: the prefix, the
    unmerged A tokens, then the B tokens, each in the order they came (as the authors' code orders
    them behind a class token)."""
    metric = keys.mean(dim=0)  # [N, d], mean over heads
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_set = [i for i in range(0, len(tokens), 2) if i >= prefix]
    b_set = [i for i in range(1, len(tokens), 2) if i >= prefix]
    best = {}
    for a in a_set:
        scores = [float(metric[a] @ metric[b]) for b in b_set]
        partner = max(range(len(b_set)), key=scores.__getitem__)
        best[a] = (scores[partner], b_set[partner])
    merged = sorted(a_set, key=lambda a: -best[a][0])[:r]
    sums = {i: tokens[i] * size[i] for i in range(len(tokens)) if i not in merged}
    sizes = {i: size[i].clone() for i in sums}
    for a in merged:
        b = best[a][1]
        sums[b] = sums[b] + tokens[a] * size[a]
        sizes[b] = sizes[b] + size[a]
    keep = list(range(prefix)) + [a for a in a_set if a not in merged] + b_set
    return (torch.stack([sums[i] / sizes[i] for i in keep]), torch.stack([sizes[i] for i in keep]))


def _plain_tome(model: nn.Module, pixels: Tensor, r: int) -> Tensor:
    """timm's VisionTransformer with ToMe written out: proportional attention, merge after attention,
    size-weighted average pooling when the head pools."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    logits = []
    for tokens in x:
        size = torch.ones(len(tokens))
        for block in model.blocks:
            attn = block.attn
            heads, dim = attn.num_heads, attn.head_dim
            qkv = attn.qkv(block.norm1(tokens)).reshape(len(tokens), 3, heads, dim).permute(1, 2, 0, 3)
            q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
            weights = ((q @ k.transpose(-1, -2)) * attn.scale + size.log()).softmax(dim=-1)
            mixed = (weights @ v).transpose(0, 1).reshape(len(tokens), heads * dim)
            tokens = tokens + block.ls1(attn.proj(mixed))
            tokens, size = _plain_merge(tokens, size, k, min(r, (len(tokens) - prefix) // 2), prefix)
            tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
        tokens = model.norm(tokens)
        if model.global_pool == "avg":
            pooled = (tokens[prefix:] * size[prefix:, None]).sum(dim=0) / size[prefix:].sum()
        else:
            pooled = tokens[0]
        logits.append(model.head(model.fc_norm(pooled)))
    return torch.stack(logits)


@pytest.mark.parametrize(("host", "r"), [("timm-vit", 6), ("timm-vit", 16), ("timm-reg-gap", 5)])
def test_patched_tome_equals_a_plain_implementation(host, r):
    model = strengthen(timm_model(host))
    pixels = images(2)
    with torch.no_grad():
        expected = _plain_tome(model, pixels, r)
        ts.patch(model, ts.ToMe(r=r))
        got = model(pixels)
    assert not torch.allclose(expected, _unmerged(model, pixels), atol=1e-3)  # the merge changes the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _unmerged(model: nn.Module, pixels: Tensor) -> Tensor:
    with torch.no_grad(), ts.pruning_disabled(model):
        return model(pixels)

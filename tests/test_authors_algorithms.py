"""Each baseline against a plain transcription of its authors' algorithm at inference.

A transcription is a loop over the host's own blocks (timm's ViT-S / DeiT-S, random weights, the
host's q/k/v, projections and MLP called directly), written from the method's paper: no fast
paths, no slots, no shared helpers with the library. The patched model's logits must equal it.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from models import images, strengthen
from torch import Tensor, nn

import tokensieve as ts

TOLERANCE = 1e-4  # fp32, logits
DEPTH = 6  # full width and resolution (196 patches), half the depth, to keep the test fast
LAYERS = (1, 3, 4)  # pruning blocks of Top-K, EViT and DynamicViT (their papers: 3, 6, 9 of 12)
KEEP = 0.7
PREFIX_PARAMETERS = ("cls_token", "dist_token", "reg_token")


def _host(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=DEPTH, num_classes=10, **overrides)
    with torch.no_grad():  # timm starts prefix tokens at (near) zero, which makes class attention flat
        for parameter_name, parameter in model.named_parameters():
            if parameter_name in PREFIX_PARAMETERS:
                parameter.copy_(torch.randn(parameter.shape))
    return strengthen(model.eval())


def _patched(model: nn.Module, method: ts.Method) -> tuple[nn.Module, ts.Sieve]:
    """A patched copy of `model` (the transcription runs the unpatched one) and its handle."""
    patched = copy.deepcopy(model)
    return patched, ts.patch(patched, method)


# ---- the host's own pieces, called one by one ----

def _embed(model: nn.Module, pixels: Tensor) -> Tensor:
    """Patch embedding, prefix tokens and positions: the tokens entering block 0, [B, N, C]."""
    return model.norm_pre(model._pos_embed(model.patch_embed(pixels)))


def _attend(block: nn.Module, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x plus the block's attention branch, with the attention weights [B, H, N, N] and keys
    [B, H, N, d]. `size` [B, N] adds log(size) to the logits of each key (proportional attention)."""
    attn = block.attn
    batch, tokens, width = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    weights = logits.softmax(dim=-1)
    mixed = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return x + block.ls1(attn.proj(mixed)), weights, k


def _mlp(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.ls2(block.mlp(block.norm2(x)))


def _logits(model: nn.Module, x: Tensor, size: Tensor | None = None) -> Tensor:
    """The host's norm and head; an average-pooling head weighs each token by its size (as ToMe's
    authors pool merged tokens)."""
    x = model.norm(x)
    if model.global_pool != "avg":
        return model.forward_head(x)
    patches = x[:, model.num_prefix_tokens :]
    weights = torch.ones(patches.shape[:2]) if size is None else size[:, model.num_prefix_tokens :]
    pooled = (patches * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    return model.head(model.fc_norm(pooled))


def _dense(model: nn.Module, pixels: Tensor) -> Tensor:
    x = _embed(model, pixels)
    for block in model.blocks:
        x = _mlp(block, _attend(block, x)[0])
    return _logits(model, x)


def _gather(x: Tensor, positions: Tensor) -> Tensor:
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


# ---- EViT (Liang et al., ICLR 2022) and Top-K ----

def _evit(model: nn.Module, pixels: Tensor, fuse: bool) -> Tensor:
    """After the attention of each pruning block, the class token's attention to each other token,
    averaged over heads, ranks them; the ceil(keep * n) best go on. With fusion, the others become
    one token placed after the kept ones: their sum weighted by that attention (not normalised).
    The fused token is one of the n tokens at the next pruning block. Without fusion: Top-K."""
    x = _embed(model, pixels)
    for layer, block in enumerate(model.blocks):
        x, weights, _ = _attend(block, x)
        if layer in LAYERS:
            attention = weights[:, :, 0, 1:].mean(dim=1)  # [B, n]
            count = math.ceil(KEEP * attention.shape[1])
            best = attention.topk(count, dim=1).indices  # best first
            others = x[:, 1:]
            parts = [x[:, :1], _gather(others, best)]
            if fuse:
                inattentive = torch.ones_like(attention).scatter(1, best, 0.0)
                parts.append((others * (attention * inattentive)[..., None]).sum(dim=1, keepdim=True))
            x = torch.cat(parts, dim=1)
        x = _mlp(block, x)
    return _logits(model, x)


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "nofuse"])
def test_evit_equals_its_authors_algorithm(fuse):
    model = _host("deit_small_patch16_224")
    pixels = images(2, 224, 224)
    patched, _ = _patched(model, ts.EViT(keep=KEEP, layers=LAYERS, fuse=fuse))
    with torch.no_grad():
        expected, dense, got = _evit(model, pixels, fuse), _dense(model, pixels), patched(pixels)
    assert (expected - dense).abs().max() > 1e-2  # pruning changes the logits
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_topk_equals_class_attention_top_k():
    model = _host("deit_small_patch16_224")
    pixels = images(2, 224, 224)
    patched, _ = _patched(model, ts.TopK(keep=KEEP, layers=LAYERS))
    with torch.no_grad():
        expected, dense, got = _evit(model, pixels, fuse=False), _dense(model, pixels), patched(pixels)
    assert (expected - dense).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


# ---- DynamicViT (Rao et al., NeurIPS 2021) ----

class _ScorePredictor(nn.Module):
    """DynamicViT's prediction module: an MLP embeds each token; the first half of the embedding is
    the token's local feature, the mean of the second half over the tokens the image's global one;
    a second MLP maps [local, global] to log-probabilities of (drop, keep)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4),
                                   nn.GELU(), nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, tokens: Tensor) -> Tensor:
        features = self.embed(tokens)
        half = features.shape[-1] // 2
        local, global_ = features[..., :half], features[..., half:].mean(dim=1, keepdim=True)
        return self.score(torch.cat([local, global_.expand_as(local)], dim=-1))


def _copied_predictor(part: nn.Module, dim: int) -> _ScorePredictor:
    """A transcription predictor with the weights of the library's predictor `part`, layer by layer."""
    predictor = _ScorePredictor(dim)
    theirs = [m for m in part.modules() if isinstance(m, (nn.LayerNorm, nn.Linear))]
    mine = [m for m in predictor.modules() if isinstance(m, (nn.LayerNorm, nn.Linear))]
    assert [type(m) for m in theirs] == [type(m) for m in mine]
    for source, target in zip(theirs, mine, strict=True):
        target.load_state_dict(source.state_dict())
    return predictor.eval()


def _dynamicvit(model: nn.Module, pixels: Tensor, predictors: dict[int, _ScorePredictor]) -> Tensor:
    """Before the s-th pruning block (s = 1, 2, ...), the predictor scores the tokens other than the
    class token; the int(keep**s * N0) with the highest keep score go on, N0 the input's patch count."""
    x = _embed(model, pixels)
    input_patches = x.shape[1] - 1
    for layer, block in enumerate(model.blocks):
        if layer in LAYERS:
            stage = LAYERS.index(layer) + 1
            keep_score = predictors[layer](x[:, 1:])[..., 1]
            best = keep_score.topk(int(input_patches * KEEP**stage), dim=1).indices
            x = torch.cat([x[:, :1], _gather(x[:, 1:], best)], dim=1)
        x = _mlp(block, _attend(block, x)[0])
    return _logits(model, x)


def test_dynamicvit_at_inference_equals_its_authors_algorithm():
    model = _host("deit_small_patch16_224")
    pixels = images(2, 224, 224)
    patched, sieve = _patched(model, ts.DynamicViT(keep=KEEP, layers=LAYERS))
    predictors = {layer: _copied_predictor(sieve.parts[0][str(layer)], model.embed_dim) for layer in LAYERS}
    with torch.no_grad():
        expected, dense, got = _dynamicvit(model, pixels, predictors), _dense(model, pixels), patched(pixels)
    assert (expected - dense).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


# ---- ToMe (Bolya et al., ICLR 2023) ----

def _bipartite_merge(x: Tensor, size: Tensor, metric: Tensor, r: int,
                     protected: int) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching. The sequence alternates between set A (even positions) and set B
    (odd), the class token included; the first `protected` tokens (class, distillation, registers)
    wherever they fall take part in no match. Each A token's edge goes to its most similar B token
    (cosine of the metric); the r best edges merge their A token into that B token, as the
    size-weighted mean. The result holds the protected tokens, the A tokens left (in sequence order
    when tokens are protected, else in the order of their edges, best first), then the B tokens."""
    tokens = x.shape[1]
    set_a, set_b = torch.arange(0, tokens, 2), torch.arange(1, tokens, 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = unit[:, set_a] @ unit[:, set_b].transpose(1, 2)  # [B, |A|, |B|]
    similarity[:, set_a < protected, :] = -math.inf
    similarity[:, :, set_b < protected] = -math.inf
    best, partner = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged, left = ranked[:, :r], ranked[:, r:]
    if protected:
        left = left.sort(dim=-1).values
    outputs, sizes = [], []
    for sample in range(x.shape[0]):
        total = x[sample] * size[sample, :, None]  # size-weighted sums, then one division
        count = size[sample].clone()
        for a in merged[sample].tolist():
            source, target = int(set_a[a]), int(set_b[partner[sample, a]])
            total[target] += total[source]
            count[target] += count[source]
        order = (list(range(protected))
                 + [int(set_a[a]) for a in left[sample].tolist() if set_a[a] >= protected]
                 + [int(b) for b in set_b if b >= protected])
        outputs.append(total[order] / count[order, None])
        sizes.append(count[order])
    return torch.stack(outputs), torch.stack(sizes)


def _tome(model: nn.Module, pixels: Tensor, r: int) -> Tensor:
    """In every block, between attention and MLP, merge r tokens (at most half of the unprotected
    ones) by bipartite matching of the keys averaged over heads; attention adds log(size) to each key."""
    protected = model.num_prefix_tokens
    x = _embed(model, pixels)
    size = torch.ones(x.shape[:2])
    for block in model.blocks:
        x, _, keys = _attend(block, x, size)
        merges = min(r, (x.shape[1] - protected) // 2)
        if merges > 0:
            x, size = _bipartite_merge(x, size, keys.mean(dim=1), merges, protected)
        x = _mlp(block, x)
    return _logits(model, x, size)


TOME_HOSTS = {
    "vit": ("vit_small_patch16_224", {}),
    "deit-distilled": ("deit_small_distilled_patch16_224", {}),  # class and distillation tokens
    "registers": ("vit_small_patch16_224", {"reg_tokens": 4}),  # class token and 4 registers
    "no-class-token": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
}


@pytest.mark.parametrize("r", [8, 13])
@pytest.mark.parametrize("host", list(TOME_HOSTS))
def test_tome_equals_its_authors_algorithm(host, r):
    name, overrides = TOME_HOSTS[host]
    model = _host(name, **overrides)
    pixels = images(2, 224, 224)
    patched, _ = _patched(model, ts.ToMe(r=r))
    with torch.no_grad():
        expected, dense, got = _tome(model, pixels, r), _dense(model, pixels), patched(pixels)
    assert (expected - dense).abs().max() > 1e-2  # merging changes the logits
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)

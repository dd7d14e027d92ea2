"""MADTP: alignment tokens shared by an image and a text tower guide per-sample pruning of both."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.fields import real_within, whole_from
from tokensieve.methods.base import AttentionView, Method, MethodRun, needs_class_token, token_queries
from tokensieve.methods.fields import check_layers, flag, layer_indices, optional, settle
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState, Trace

POOLED_REPORT = "madtp_pooled"  # what a training call reports: [B, M, W] pooled features, summed over layers
IMPORTANCE_REPORT = "madtp_importance"  # what every call reports: LayerImportance per pruning layer
_SCORES = "madtp_scores"  # scratch: the layer's token-bank scores, from before_block to after_attention
_TEMPERATURE = "madtp_temperature"  # scratch: the call's T, read once from the shared buffer
_EPSILON = 1e-8
MIN_PRUNED = 2  # a sample prunes at a layer only if at least this many of its tokens would go


@dataclass(frozen=True)
class MADTP(Method):
    """A bank of `alignment_tokens` learnable alignment tokens (`alignment_width` wide; None: the
    widest patched tower's width), shared by every tower patched together (an image tower and a
    text tower: `tokensieve.patch([vision, text], MADTP())`) and by all their layers, guides the
    pruning of each tower at each of `layers` (None: every block from `start_layer` on, in each
    tower: towers of different depths share the rule).

    At each such block, the non-prefix tokens entering it are scored against the bank,
    S[n, m] = x_n · E_m (through a per-layer linear map where the tower's width differs from the
    bank's, or everywhere with `project`). After self-attention (before the MLP, and before a text
    tower's cross-attention) each token's importance is the mean of three terms over the sample's
    tokens: the attention it receives (max over heads, summed over the real non-prefix queries),
    divided by its sum; its best match to any alignment token (max over m of S), divided by its
    sum; the class token's attention to it, each head weighted per token by its share of the
    heads' output norms. A sample's threshold is min over m of Σ_n softmax_n(S[n, m] / T) · I_n;
    its tokens rated above it are kept (at least one), the others merged into one token, their
    importance-weighted mean, placed after the kept ones (a later layer treats it as any token). A
    sample prunes at a layer only if at least two of its tokens would go. Prefix tokens are always
    kept; text padding is never a query, a candidate or part of a merged token.

    Each sample keeps its own count (a ragged batch: each sample's output equals running it
    alone). `batch_max=True` keeps, in every sample, its best-rated tokens at the batch's largest
    count, as the authors' code does. `temperature=0` prunes nothing; a higher T prunes more. T
    lives in a buffer shared by the towers, set from `temperature` when patched and by
    `tokensieve.calibrate_temperature` to a MACs budget, and stored with the bank.

    Training (model.train()) prunes as inference does; the importance reaches the bank through
    the merge weights. Each training call also reports its pooled features per alignment token
    (softmax over its tokens of S / √width, summed over the layers), and `losses` gives
    `alignment`: alignment_weight · the mean over samples and alignment tokens of 1 − cos between
    the image tower's and the text tower's pooled features (a tower run on k samples per pair,
    as NLVR's two images in one batch, averaged over them).

    `aligned=False` is the ablation without alignment guidance: importance from the two attention
    terms alone, and no alignment loss; the bank still sets each sample's threshold.
    """

    temperature: float = 1.0
    layers: tuple[int, ...] | None = None
    start_layer: int = 0
    alignment_tokens: int = 100
    alignment_width: int | None = None
    project: bool = False
    alignment_weight: float = 0.1
    batch_max: bool = False
    aligned: bool = True

    # T is the shared buffer's once patched (a checkpoint brings its own): the field only starts it
    inference_fields: ClassVar[frozenset[str]] = frozenset({"temperature", "batch_max"})

    def __post_init__(self) -> None:
        settle(self, temperature=real_within(0.0), layers=optional(layer_indices), start_layer=whole_from(0),
               alignment_tokens=whole_from(1), alignment_width=optional(whole_from(1)), project=flag,
               alignment_weight=real_within(0.0), batch_max=flag, aligned=flag)
        if self.layers is not None and self.start_layer:
            raise ValueError(f"MADTP(layers={self.layers}, start_layer={self.start_layer}): give the "
                             "blocks that prune either as `layers` or as every block from `start_layer` "
                             "on, not both")

    @property
    def ragged(self) -> bool:
        return not self.batch_max  # whatever T starts at: calibration or a checkpoint may raise it

    @property
    def keeps_positions(self) -> bool:
        return True  # kept tokens continue their positions; the merged one, appended, has none (as EViT's)

    def pruning_layers(self, spec: ModelSpec) -> tuple[int, ...]:
        if self.layers is not None:
            return check_layers(self.layers, spec.depth, "MADTP")
        if self.start_layer >= spec.depth:
            raise ValueError(f"MADTP(start_layer={self.start_layer}) would prune no block of a tower of "
                             f"{spec.depth} blocks; use 0..{spec.depth - 1}")
        return tuple(range(self.start_layer, spec.depth))

    def reads_attention_summary(self, layer: int) -> bool:
        blocks = layer >= self.start_layer if self.layers is None else layer in self.layers
        return self.temperature > 0.0 and blocks

    def bind(self, spec: ModelSpec) -> None:
        needs_class_token(spec, "MADTP")
        self.pruning_layers(spec)
        return None

    def bind_shared(self, specs: Sequence[ModelSpec]) -> nn.ModuleDict:
        width = self.alignment_width or max(spec.dim for spec in specs)
        parts = nn.ModuleDict({"bank": AlignmentBank(self.alignment_tokens, width, self.temperature)})
        for tower, spec in enumerate(specs):
            if self.project or spec.dim != width:
                projections = (nn.Linear(spec.dim, width) for _ in range(spec.depth))
                parts[f"project{tower}"] = nn.ModuleList(projections)
        return parts

    def start(self, state: TokenState, run: MethodRun) -> TokenState:
        run.scratch[_TEMPERATURE] = float(run.shared["bank"].temperature)  # read once a call
        return state

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if run.scratch[_TEMPERATURE] == 0.0 or layer not in self.pruning_layers(run.spec):
            return state
        # The whole sequence is scored and the prefix's rows dropped after: the tokens' slice past the
        # prefix is not one block of memory, and a product over it would copy it first.
        projections = getattr(run.shared, f"project{run.module}", None)  # only where widths differ
        features = state.x if projections is None else projections[layer](state.x)
        bank = run.shared["bank"].tokens
        scores = (features @ bank.to(features.dtype).T)[:, state.prefix :]  # [B, N, M]
        run.scratch[_SCORES] = scores
        features = features[:, state.prefix :]
        counts = state.token_counts()  # the prefix's rows are computed too
        macs = counts * bank.numel()
        if projections is not None:
            macs = macs + counts * features.shape[-1] * state.x.shape[-1]
        if run.training and self.aligned:  # pooled features per alignment token, for the alignment loss
            pooled = _softmax_over_tokens(scores / math.sqrt(bank.shape[1]), state.patch_valid())
            layer_pooled = pooled.transpose(1, 2) @ features  # [B, M, W]
            before = run.trace.reports.get(POOLED_REPORT)
            run.report(POOLED_REPORT, layer_pooled if before is None else before + layer_pooled)
            macs = macs + state.patch_counts() * bank.numel()
        run.trace.add_overhead("alignment", macs)
        return state

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        run: MethodRun) -> TokenState:
        scores = run.scratch.pop(_SCORES, None)
        if scores is None:
            return state
        valid = state.patch_valid()
        scores = scores.float()  # rated in fp32: in fp16 the sums' epsilon vanishes and S / T overflows
        importance = layer_importance(attn, scores, valid, self.aligned)
        threshold = alignment_threshold(scores, importance, run.scratch[_TEMPERATURE], valid)
        candidates = importance > threshold[:, None]
        if valid is not None:
            candidates &= valid
        counts = candidates.sum(dim=1)
        available = state.patch_counts()
        available = counts.new_full(counts.shape, available) if isinstance(available, int) else available
        if self.batch_max:  # the batch's largest count, at most what each sample has
            counts = torch.minimum(counts.max().expand_as(counts), available)
        # none above the threshold, or fewer than two tokens to merge: the sample keeps every token
        counts = torch.where((counts == 0) | (available - counts < MIN_PRUNED), available, counts)
        run.append_report(IMPORTANCE_REPORT, LayerImportance(layer, importance, threshold, counts))
        if not bool((counts < available).any()):
            return state
        ranked = importance if valid is None else importance.masked_fill(~valid, -math.inf)
        equal = bool((counts == counts[0]).all())
        slots, kept_valid = ops.keep_top(ranked, int(counts[0]) if equal else counts, state.prefix, valid)
        if state.trace is not None:
            state.trace.add_overhead("merge", state.patch_counts() * state.x.shape[-1])
        return state.fuse_rest(slots, importance, kept_valid, normalized=True)  # importance in fp32

    def losses(self, traces: Sequence[Trace]) -> dict[str, Tensor]:
        if self.alignment_weight == 0.0:
            return {}
        by_tower: dict[int, list[Tensor]] = {}
        for trace in traces:
            if POOLED_REPORT in trace.reports:
                by_tower.setdefault(trace.module, []).append(trace.reports[POOLED_REPORT])
        if len(by_tower) < 2:
            return {}
        if len(by_tower) > 2:
            raise ValueError("MADTP aligns two towers (an image and a text tower); patch those two together")
        first, second = (torch.cat(pooled) for _, pooled in sorted(by_tower.items()))
        first, second = _paired(first, second), _paired(second, first)
        similarity = F.cosine_similarity(first, second, dim=-1, eps=_EPSILON)  # [B, M]
        return {"alignment": self.alignment_weight * (1.0 - similarity).mean()}


class AlignmentBank(nn.Module):
    """The alignment tokens [M, W], standard-normal at the start as the authors' bank, and the
    pruning temperature T (a buffer: calibration sets it, checkpoints keep it)."""

    def __init__(self, tokens: int, width: int, temperature: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(tokens, width))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AlignmentBank:
        # T stays float64 whatever the weights are cast to: its value is the calibrated one
        temperature = self.temperature
        super()._apply(fn, recurse)
        self.temperature = temperature.to(self.tokens.device)
        return self


@dataclass(frozen=True)
class LayerImportance:
    """One pruning layer of a call: each token's importance, each sample's threshold and count kept."""

    layer: int
    importance: Tensor  # [B, N] per non-prefix token
    threshold: Tensor  # [B]
    kept: Tensor  # [B] non-prefix tokens kept (the rest merged into one)


def layer_importance(attn: AttentionView, scores: Tensor, valid: Tensor | None,
                     aligned: bool = True) -> Tensor:
    """[B, N] the importance of each non-prefix token: the mean of the attention it receives and
    its best alignment match, each divided by its sum over the sample's tokens, and the class
    token's attention to it weighted per head by the heads' output norms (without `aligned`, the
    mean of the two attention terms alone)."""
    state = attn.state
    prefix = state.prefix
    summary = attn.summary  # of the map the block's attention used
    if summary is None:  # attention the host ran its own way: the map again, at its cost
        weights = ops.attention_weights(attn.q, attn.k, attn.bias, attn.scale)
        summary = ops.summarize_attention(weights, token_queries(state))
        if state.trace is not None:
            width = attn.k.shape[1] * attn.k.shape[3]
            state.trace.add_overhead("importance", state.token_counts() ** 2 * width)
    received = summary.received[:, prefix:]  # [B, N]
    best = scores.amax(dim=-1)
    if valid is not None:
        received, best = received * valid, best * valid
    received = received / (received.sum(dim=1, keepdim=True) + _EPSILON)
    best = best / (best.sum(dim=1, keepdim=True) + _EPSILON)
    heads = attn.heads_out.float().unflatten(-1, (attn.head_count, -1)).norm(dim=-1)  # [B, N, H]
    shares = heads / (heads.sum(dim=-1, keepdim=True) + _EPSILON)
    class_row = summary.first_row.float()[:, :, prefix:]  # [B, H, N]
    by_class = (class_row * shares[:, prefix:].transpose(1, 2)).sum(dim=1)  # [B, N]
    importance = (received + best + by_class) / 3.0 if aligned else (received + by_class) / 2.0
    return importance if valid is None else importance * valid


def alignment_threshold(scores: Tensor, importance: Tensor, temperature: float,
                        valid: Tensor | None) -> Tensor:
    """[B] min over alignment tokens m of Σ_n softmax_n(S[n, m] / T) · I_n: each alignment token's
    expected importance over the tokens it matches, the least of them."""
    matched = _softmax_over_tokens(scores / temperature, valid)  # [B, N, M]
    return (matched * importance[..., None]).sum(dim=1).amin(dim=1)


def _softmax_over_tokens(scores: Tensor, valid: Tensor | None) -> Tensor:
    """softmax over the tokens (dim 1) of [B, N, M] scores, padding left out."""
    if valid is not None:
        scores = scores.masked_fill(~valid[..., None], -math.inf)
    return scores.softmax(dim=1)


def _paired(pooled: Tensor, other: Tensor) -> Tensor:
    """`pooled` [R, M, W] as one row per pair of `other`'s [P, M, W]: R = k · P rows (k samples per
    pair, as NLVR's two images, stacked sample-block by sample-block) averaged over k."""
    rows, pairs = pooled.shape[0], other.shape[0]
    if rows % pairs and pairs % rows:
        raise ValueError(f"MADTP's alignment pairs the towers' samples: one tower ran {rows} samples and the "
                         f"other {pairs}; run them on the same pairs (or k samples per pair in k blocks)")
    if rows <= pairs:
        return pooled
    return pooled.view(rows // pairs, pairs, *pooled.shape[1:]).mean(dim=0)


__all__ = ["MADTP", "AlignmentBank", "LayerImportance", "alignment_threshold", "layer_importance"]

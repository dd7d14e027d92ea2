"""transformers SAM image encoder (SamVisionEncoder, SamVisionModel).

SAM's layers take and return channels-last maps [B, H, W, C]. Most attend within
non-overlapping windows of the map, padded with zeros to whole windows; the layers in
`global_attn_indexes` attend over the whole map. Both add a decomposed relative-position bias
(one table per axis). A convolutional neck turns the final map into the image embedding, so a
patched encoder always runs dense: pruned cells keep their last features and the neck sees a
full map.

The executor hands this view the active tokens and their input positions (`state.index`, the
row-major cell of the map); `SamLayerView.attend` puts each token back in its window, lets it
attend to the active tokens of that window (and the host's zero-padding cells, which the host
has as keys too), with the bias looked up from each token's (row, col). It computes nothing for
a ragged batch's padding rows, and keeps each attention call small enough to stay in cache
(windows in batches of similar counts, global layers one sample at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokensieve import calls, ops
from tokensieve.hosts.base import Host, linear_macs
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState

FAMILY = "transformers SamVisionEncoder/SamVisionModel (for SamModel, patch model.vision_encoder)"
_ENCODERS = ("SamVisionEncoder", "SamVisionModel")
# Windows batched together hold at least this share of the batch's largest member count, and
# are at most this many: a larger batch's scores and bias leave the cache.
_WINDOW_BATCH_SHARE = 0.9
_WINDOWS_PER_BATCH = 16


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ in (*_ENCODERS, "SamModel") and cls.__module__.startswith("transformers.")


class SamLayerView:
    """SamVisionLayer: layer_norm1, attn (fused qkv, relative positions, proj), layer_norm2, mlp."""

    def __init__(self, layer: nn.Module) -> None:
        attn = layer.attn
        self.layer, self.attn = layer, attn
        self.num_heads = attn.num_attention_heads
        self.head_dim = attn.qkv.out_features // (3 * self.num_heads)
        self.scale = attn.scale
        self.window = layer.window_size  # 0: global attention over the whole map
        self.attention_linear_macs = linear_macs(attn)
        self.mlp_macs = linear_macs(layer.mlp)

    # BlockView

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, H, N, d] each, without positions; the executor calls `attend` instead."""
        q, k, v = self._token_qkv(x)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        return calls.linear(self.attn.proj, heads_out)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return calls.mlp(self.layer.mlp, self.layer.layer_norm2(x))

    def attention_dropout(self) -> float:
        return self.attn.dropout if self.attn.training else 0.0

    # PositionalAttention

    def attend(self, x: Tensor, state: TokenState, eager: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Runs on the real tokens only: a ragged batch's padding rows get no queries, keys or
        values (they are no member of any window and no key), and read back as zeros."""
        batch, tokens, _ = x.shape
        heads, dim = self.num_heads, self.head_dim
        rows = None if state.valid is None else state.valid.flatten().nonzero()[:, 0]  # [T] of [B * N]
        real = x.flatten(0, 1) if rows is None else x.flatten(0, 1).index_select(0, rows)
        out, qkv = self._attend_real(real, rows, state, eager)  # [T, H, d], [T + 1, 3, H, d]
        q, k = qkv[:-1, 0], qkv[:-1, 1]
        if rows is not None:  # back to the padded batch, zeros on its padding rows
            out, q, k = (t.new_zeros(batch * tokens, heads, dim).index_copy_(0, rows, t) for t in (out, q, k))
        q, k = (t.view(batch, tokens, heads, dim).transpose(1, 2) for t in (q, k))
        return out.view(batch, tokens, heads * dim), q, k

    def attend_rows(self, real: Tensor, rows: Tensor, state: TokenState, eager: bool) -> Tensor:
        """`attend` for a caller that runs the rest of the block on a ragged batch's real tokens
        alone: their block input `real` [T, C] (the `rows` of the flattened batch) -> their
        attention output [T, H*d], without placing it, or the queries and keys, back in the batch."""
        return self._attend_real(real, rows, state, eager)[0].flatten(1)

    def _attend_real(self, real: Tensor, rows: Tensor | None, state: TokenState,
                     eager: bool) -> tuple[Tensor, Tensor]:
        """The real tokens' block input [T, C] -> their attention output [T, H, d], and the
        queries, keys and values [T + 1, 3, H, d] it used (`_packed_qkv`)."""
        qkv = self._packed_qkv(real)
        attend = self._window_attention if self.window else self._global_attention
        return attend(qkv, rows, state, _require_map(state.map_size), eager), qkv

    def attention_macs(self, index: Tensor, valid: Tensor | None, map_size: tuple[int, int] | None) -> Tensor:
        map_size = _require_map(map_size)
        width = self.num_heads * self.head_dim
        if self.window:
            layout = _WindowLayout.of(index, valid, map_size, self.window)
            members = layout.counts.view(index.shape[0], -1).double()  # [B, windows]
            pairs, queries = (members**2).sum(dim=1), members.sum(dim=1)
            bias_span = 2 * self.window  # each query meets one table row per axis
        else:
            queries = torch.full((index.shape[0],), float(index.shape[1]), dtype=torch.float64)
            if valid is not None:
                queries = valid.sum(dim=1).double()
            pairs = queries**2
            bias_span = map_size[0] + map_size[1]
        macs = 2 * pairs * width  # scores and weighted values
        if self.attn.use_rel_pos:
            macs = macs + queries * bias_span * width
        return macs

    # attention over the active tokens

    def _token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block input [B, N, C] -> queries, keys, values [B, N, H, d] (normalised, as the host)."""
        batch, tokens, _ = x.shape
        qkv = calls.linear(self.attn.qkv, self.layer.layer_norm1(x))
        return qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)

    def _packed_qkv(self, real: Tensor) -> Tensor:
        """The real tokens' block input [T, C] -> their queries, keys and values [T + 1, 3, H, d]
        and, last, a padding cell's: the host pads the normalised map with zeros, so one zero row
        gives every padding cell's."""
        normed = self.layer.layer_norm1(real)
        normed = torch.cat([normed, normed.new_zeros(1, normed.shape[1])])
        return calls.linear(self.attn.qkv, normed).view(normed.shape[0], 3, self.num_heads, self.head_dim)

    def _global_attention(self, qkv: Tensor, rows: Tensor | None, state: TokenState,
                          map_size: tuple[int, int], eager: bool) -> Tensor:
        """Each sample's real tokens attend to each other, one sample at a time: the bias of a
        whole batch ([B, H, N, N]) would not stay in cache."""
        batch, tokens = state.index.shape
        counts = [tokens] * batch if rows is None else state.valid.sum(dim=1).tolist()
        index = _real(state.index, rows)  # [T]
        keep = None if state.keep is None else _real(state.keep, rows)
        tables = self._relative_tables(map_size, qkv.dtype)
        outs, start = [], 0
        for count in counts:
            end = start + count
            q, k, v = qkv[start:end].permute(1, 2, 0, 3)[:, None].unbind(0)  # [1, H, n, d] each
            cells = index[None, start:end]
            bias = self._position_bias(q, cells // map_size[1], cells % map_size[1], map_size, tables)
            sample_keep = None if keep is None else keep[None, start:end]
            outs.append(self._attention(q, k, v, bias, sample_keep, eager)[0].transpose(0, 1))  # [n, H, d]
            start = end
        return torch.cat(outs)

    def _window_attention(self, qkv: Tensor, rows: Tensor | None, state: TokenState,
                          map_size: tuple[int, int], eager: bool) -> Tensor:
        """The active tokens of each window and its padding cells attend to each other (the
        padding cells' own outputs are dropped, as the host drops them).

        Windows of similar member counts run as one batch, padded to its largest count with masked
        keys: a pruned map's windows hold any count, and one small attention per distinct count
        costs more in calls than the padding does. Training (mask mode) batches exact counts only.
        """
        batch, tokens = state.index.shape
        size, heads, dim = self.window, self.num_heads, self.head_dim
        layout = _WindowLayout.of(state.index, state.valid, map_size, size)
        width = layout.rows.shape[1]  # tokens, then the padding cells
        sample, column = layout.order // width, layout.order % width
        real_tokens = qkv.shape[0] - 1
        packed = sample * tokens + column  # a token member's row of the flattened batch ...
        if rows is not None:  # ... and of its real tokens
            packed = (state.valid.flatten().cumsum(0) - 1)[packed.clamp_max(batch * tokens - 1)]
        is_token = column < tokens
        # Per member, in window order: its row of `qkv`, its cell in the window, and the row of `out`
        # its output goes to (padding cells' outputs, dropped, each to a row of its own past the
        # tokens'). A last entry stands for the rows that pad a batch to its largest count.
        members = torch.stack([
            torch.where(is_token, packed, real_tokens),
            ((layout.rows % size) * size + layout.cols % size).flatten()[layout.order],
            torch.where(is_token, packed, real_tokens + layout.order),
        ])
        spare = real_tokens + batch * width  # the first row past every member's
        members = torch.cat([members, members.new_tensor([[real_tokens], [0], [spare]])], dim=1)
        keep = state.keep
        if keep is not None:  # mask mode: padding cells always take part
            keep = torch.cat([_real(keep, rows), keep.new_ones(1)])[members[0]]
        counts = layout.counts.tolist()
        starts = layout.counts.cumsum(0) - layout.counts
        tables = self._relative_tables((size, size), qkv.dtype)
        share = 1.0 if keep is not None else _WINDOW_BATCH_SHARE

        # One spare row per padded position a batch can have, so that no two outputs share a row.
        # Every token row is written once (each token is a member of exactly one window), so the
        # buffer is not zeroed: at batch 16 zeroing it cost as much as a tenth of the attention.
        out = qkv.new_empty(spare + max(counts) * len(counts), heads, dim)
        for windows in _window_batches(counts, share, _WINDOWS_PER_BATCH):
            windows = torch.tensor(windows, device=qkv.device)
            count = counts[int(windows[0])]  # the batch's largest
            position = torch.arange(count, device=qkv.device)
            real = position < layout.counts[windows, None]  # [G, n]
            chosen = torch.where(real, starts[windows, None] + position, members.shape[1] - 1)
            source, slots, destination = members[:, chosen]  # [G, n] each
            if not bool(real.all()):
                padded = spare + torch.arange(real.numel(), device=qkv.device).view_as(real)
                destination = torch.where(real, destination, padded)
            q, k, v = qkv[source].permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, n, d] each
            bias = self._position_bias(q, slots // size, slots % size, (size, size), tables)
            if not bool(real.all()):
                mask = real[:, None, None, :]
                bias = mask if bias is None else bias.masked_fill(~mask, -torch.inf)
            group_keep = None if keep is None else keep[chosen]
            group_out = self._attention(q, k, v, bias, group_keep, eager)
            out.index_copy_(0, destination.flatten(), group_out.transpose(1, 2).flatten(0, 1))
        return out[:real_tokens]

    def _relative_tables(self, span: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The host's relative-position tables [span, span, d], one per axis, or None without."""
        attn = self.attn
        if not attn.use_rel_pos:
            return None
        return (attn.get_rel_pos(span[0], span[0], attn.rel_pos_h).to(dtype),
                attn.get_rel_pos(span[1], span[1], attn.rel_pos_w).to(dtype))

    def _position_bias(self, q: Tensor, rows: Tensor, cols: Tensor, span: tuple[int, int],
                       tables: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """Decomposed relative-position bias [G, H, n, n] between tokens at (rows, cols) [G, n].

        For query i and key j it is q_i . T_h[row_i, row_j] + q_i . T_w[col_i, col_j], with the
        host's tables T over a span of `span` cells per axis (the window, or the whole map).
        """
        if tables is None:
            return None
        table_h, table_w = tables
        groups, heads, tokens, dim = q.shape
        if _fills_span(rows, cols, span):  # nothing pruned here: the host's own layout, no gathers
            cells = q.reshape(groups, heads, span[0], span[1], dim)
            # contiguous, so that their broadcast sum is laid out as [G, H, n, n]
            by_row = torch.einsum("ghxyd,xsd->ghxys", cells, table_h).contiguous()
            by_col = torch.einsum("ghxyd,ysd->ghxys", cells, table_w).contiguous()
            return (by_row[..., :, None] + by_col[..., None, :]).view(groups, heads, tokens, tokens)
        # Each query against its own table rows (every key cell of the span), then the keys' cells.
        by_row = torch.einsum("ghnd,gnsd->ghns", q, table_h[rows])  # [G, H, n, span_h]
        by_col = torch.einsum("ghnd,gnsd->ghns", q, table_w[cols])
        if span[0] * span[1] <= 2 * tokens:  # a window: one gather from each query's whole span
            whole = (by_row[..., :, None] + by_col[..., None, :]).flatten(-2)  # [G, H, n, cells]
            cells = (rows * span[1] + cols)[:, None, None, :].expand(-1, heads, tokens, -1)
            return whole.gather(-1, cells)
        return (by_row.gather(-1, rows[:, None, None, :].expand(-1, heads, tokens, -1))
                + by_col.gather(-1, cols[:, None, None, :].expand(-1, heads, tokens, -1)))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None,
                   eager: bool) -> Tensor:
        if keep is not None:
            return ops.policy_attention(q, k, v, keep, self.scale, bias=bias)
        return ops.attention(q, k, v, bias, self.scale, self.attention_dropout(), eager)


def _real(values: Tensor, rows: Tensor | None) -> Tensor:
    """[B, N] -> [T]: the values of a batch's real tokens (`rows` of the flattened batch, or all)."""
    flat = values.flatten()
    return flat if rows is None else flat[rows]


def _window_batches(counts: list[int], share: float, most: int) -> list[list[int]]:
    """Windows with members, in batches: each takes the remaining windows, the largest count first,
    whose count is at least `share` of the batch's largest, up to `most` of them. `share` 1 batches
    equal counts only."""
    order = sorted((i for i, c in enumerate(counts) if c > 0), key=lambda i: -counts[i])
    batches, first = [], 0
    while first < len(order):
        least = math.ceil(counts[order[first]] * share)
        last = first
        while last < len(order) and last - first < most and counts[order[last]] >= least:
            last += 1
        batches.append(order[first:last])
        first = last
    return batches


def _fills_span(rows: Tensor, cols: Tensor, span: tuple[int, int]) -> bool:
    """Whether every group's tokens are all the cells of the span, in row-major order."""
    if rows.shape[1] != span[0] * span[1]:
        return False
    cells = rows * span[1] + cols
    return bool((cells == torch.arange(cells.shape[1], device=cells.device)).all())


def _require_map(map_size: tuple[int, int] | None) -> tuple[int, int]:
    if map_size is None:
        raise ValueError("SAM layers take [B, H, W, C] maps; run the whole encoder, not a layer on tokens")
    return map_size


def _window_grid(map_size: tuple[int, int], size: int) -> tuple[int, int]:
    """Windows per column and per row of the map padded to whole windows."""
    return math.ceil(map_size[0] / size), math.ceil(map_size[1] / size)


def _padding_cells(map_size: tuple[int, int], size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, cols) [P] of the cells the host adds to pad the map to whole windows."""
    grid_rows, grid_cols = _window_grid(map_size, size)
    rows = torch.arange(grid_rows * size, device=device)[:, None].expand(-1, grid_cols * size)
    cols = torch.arange(grid_cols * size, device=device)[None, :].expand(grid_rows * size, -1)
    outside = (rows >= map_size[0]) | (cols >= map_size[1])
    return rows[outside], cols[outside]


@dataclass
class _WindowLayout:
    """Which window each active token and padding cell of a batch falls in.

    Members of a window are its active tokens and, if it has any, its padding cells (a window
    with no active token has nothing to compute). Columns are the N tokens, then the P cells.
    """

    rows: Tensor  # [B, N + P] map row of each token and padding cell
    cols: Tensor  # [B, N + P]
    order: Tensor  # [M'] flat positions of [B, N + P] sorted by window, then cell; non-members last
    counts: Tensor  # [B * windows] members of each window, windows numbered sample-major

    @classmethod
    def of(cls, index: Tensor, valid: Tensor | None, map_size: tuple[int, int], size: int) -> _WindowLayout:
        batch, tokens = index.shape
        index = index.clamp_min(0)  # ragged padding rows (index -1) are left out by `valid`
        pad_rows, pad_cols = _padding_cells(map_size, size, index.device)
        rows = torch.cat([index // map_size[1], pad_rows.expand(batch, -1)], dim=1)
        cols = torch.cat([index % map_size[1], pad_cols.expand(batch, -1)], dim=1)
        grid_rows, grid_cols = _window_grid(map_size, size)
        windows = (rows // size) * grid_cols + cols // size
        windows = windows + torch.arange(batch, device=index.device)[:, None] * (grid_rows * grid_cols)
        total = batch * grid_rows * grid_cols
        active = torch.ones(batch, tokens, dtype=torch.bool, device=index.device) if valid is None else valid
        occupied = torch.bincount(windows[:, :tokens][active], minlength=total) > 0
        member = torch.cat([active, occupied[windows[:, tokens:]]], dim=1)
        slot = (rows % size) * size + cols % size
        sort_key = torch.where(member, windows * size * size + slot, total * size * size)
        order = sort_key.flatten().argsort()[: int(member.sum())]
        return cls(rows, cols, order, torch.bincount(windows[member], minlength=total))


def _pair(value: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _conv_macs(convs: Iterable[nn.Conv2d], rows: int, cols: int) -> int:
    """MACs of a chain of convolutions applied to a [rows, cols] map, one after the other."""
    total = 0
    for conv in convs:
        if conv.padding != "same":
            (kernel_h, kernel_w), (stride_h, stride_w) = conv.kernel_size, conv.stride
            pad_h, pad_w = (0, 0) if conv.padding == "valid" else conv.padding
            rows = (rows + 2 * pad_h - conv.dilation[0] * (kernel_h - 1) - 1) // stride_h + 1
            cols = (cols + 2 * pad_w - conv.dilation[1] * (kernel_w - 1) - 1) // stride_w + 1
        total += rows * cols * conv.weight.numel()
    return total


def resolve(model: nn.Module) -> Host:
    if type(model).__name__ == "SamModel":
        raise TypeError("tokensieve patches SAM's image encoder, not the whole SamModel: "
                        "ts.patch(model.vision_encoder, method); model.get_image_embeddings and "
                        "model(pixel_values=...) then run the pruned encoder")
    encoder = getattr(model, "vision_encoder", model)  # SamVisionModel wraps the encoder
    config = encoder.config
    image, patch = _pair(config.image_size), _pair(config.patch_size)
    rows, cols = image[0] // patch[0], image[1] // patch[1]
    layers = list(encoder.layers)
    views = [SamLayerView(layer) for layer in layers]
    spec = ModelSpec(
        family=f"transformers {type(model).__name__}", depth=len(views), dim=config.hidden_size,
        num_heads=views[0].num_heads, head_dim=views[0].head_dim, prefix=0, has_class_token=False,
        input_tokens=rows * cols, image_size=image[0], dense_only=True,
        global_blocks=tuple(i for i, view in enumerate(views) if not view.window),
    )
    neck_convs = [m for m in encoder.neck.modules() if isinstance(m, nn.Conv2d)]
    return Host(
        spec=spec, blocks=layers, views=views, mean_pooled=False,
        embed_macs_per_patch=encoder.patch_embed.projection.weight.numel(),
        head_macs=_conv_macs(neck_convs, rows, cols),
        checkpoints_in_layers=True,
    )

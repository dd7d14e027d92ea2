"""TokenState, the one object that flows through a pruned model, and the primitives on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

NO_POSITION = -1  # `index` of a row with no input position of its own: ragged padding, a fused token
FUSED_TOKEN_INDEX = NO_POSITION  # `index` of a token that stands for several fused input tokens


@dataclass
class LayerRecord:
    """What one block ran: token counts per sample and the method's own extra work."""

    layer: int
    attention_tokens: int | Tensor  # tokens that entered attention, int or [B]
    mlp_tokens: int | Tensor  # tokens that entered the MLP, int or [B]
    index: Tensor  # [B, N'] input position of each token after the block (-1: fused, or padding)
    valid: Tensor | None  # [B, N'] ragged padding mask after the block
    overhead: dict[str, int | Tensor] = field(default_factory=dict)  # name -> MACs per sample
    memory_tokens: int | Tensor = 0  # tokens of the other modality cross-attended, int or [B]
    # [B] MACs of the attention products when the block's view ran attention itself (windows,
    # relative positions); None: the plain 2 * N^2 * width of global attention.
    attention_macs: Tensor | None = None


@dataclass
class KeepDecision:
    """A differentiable keep decision of mask-mode training, with the share it aims for."""

    layer: int
    decisions: Tensor  # [B, N - prefix] 0/1 per non-prefix token, carrying gradient
    target: float  # share of the input tokens the method means to keep here


@dataclass
class Trace:
    """Per-call record of a pruned forward: kept tokens per layer per sample, and overhead."""

    batch: int
    input_tokens: int  # tokens entering the first block, prefix included
    prefix: int
    layers: list[LayerRecord] = field(default_factory=list)
    keep_decisions: list[KeepDecision] = field(default_factory=list)  # mask mode, one per pruning stage
    map_size: tuple[int, int] | None = None  # (rows, cols) when the blocks take [B, rows, cols, C] maps
    input_valid: Tensor | None = None  # [B, N0] False on the input's padding (padded text), None: none
    output_valid: Tensor | None = None  # [B, N_out] False on the returned rows that are padding

    def input_counts(self) -> Tensor:
        """[B] tokens of each sample entering the first block, its padding excluded."""
        if self.input_valid is None:
            return per_sample(self.input_tokens, self.batch)
        return self.input_valid.sum(dim=1).cpu()

    def output_mask(self) -> Tensor:
        """[B, N_out] long: 1 on the rows of the traced forward's output that are tokens, 0 on padding
        (a ragged batch's, or the input's). transformers' attention-mask convention, so it can be passed
        as the `encoder_attention_mask` of a text encoder that cross-attends to that output."""
        if self.output_valid is None:
            raise ValueError("this trace has no output yet: read it after the traced forward returns")
        return self.output_valid.long()

    def add_overhead(self, name: str, macs: int | Tensor) -> None:
        """Count `macs` (per sample) of method work against the block being run."""
        record = self.layers[-1].overhead
        record[name] = record.get(name, 0) + macs

    def add_keep_decision(self, decisions: Tensor, target: float) -> None:
        """Record a mask-mode decision of the block being run, for the keep-ratio loss."""
        self.keep_decisions.append(KeepDecision(self.layers[-1].layer, decisions, target))

    def kept_tokens(self) -> Tensor:
        """[L, B] tokens each sample carries out of each block (prefix included)."""
        return torch.stack([per_sample(r.mlp_tokens, self.batch) for r in self.layers])

    def attention_tokens(self) -> Tensor:
        """[L, B] tokens each sample carries into each block's attention (prefix included)."""
        return torch.stack([per_sample(r.attention_tokens, self.batch) for r in self.layers])


def per_sample(value: int | float | Tensor, batch: int, dtype: torch.dtype = torch.long) -> Tensor:
    """A count recorded as one number for the batch, or one per sample, as a CPU tensor [B]."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", dtype).expand(batch)
    return torch.full((batch,), value, dtype=dtype)


@dataclass
class TokenState:
    """Active tokens of a batch and where they came from.

    Prefix tokens (CLS, distillation, registers) sit at the front and are never pruned.
    """

    x: Tensor  # [B, N, C]
    index: Tensor  # [B, N] position in the input sequence; FUSED_TOKEN_INDEX for fused tokens
    prefix: int
    size: Tensor | None = None  # [B, N] input tokens each token stands for (merging only)
    valid: Tensor | None = None  # [B, N] bool, False on the padding of a ragged batch
    keep: Tensor | None = None  # [B, N] 0/1 keep decisions carrying gradient (mask mode only)
    grid: Tensor | None = None  # [B, N0 + 1, C] dense mode: last features of every input token
    source: Tensor | None = None  # [B, N0] dense mode with merging: each input token's active slot
    trace: Trace | None = None
    # (rows, cols) when the blocks take channels-last maps [B, rows, cols, C] (SAM): the tokens are
    # the map's cells in row-major order, so index = row * cols + col.
    map_size: tuple[int, int] | None = None

    @classmethod
    def start(cls, x: Tensor, prefix: int, dense: bool = False, valid: Tensor | None = None,
              order: Tensor | None = None) -> TokenState:
        """The state entering the first block: `x` is [B, N, C] tokens, or a [B, rows, cols, C] map.
        `valid` [B, N] marks the input's padding (False), which is never attended as a key; `order`
        [B, N] lists input positions in the order the state holds them (a host whose pooled token
        is not first puts it first, so it can score the others)."""
        map_size = None
        if x.dim() == 4:
            map_size = _check_map_input(x, prefix, dense)
            x = x.flatten(1, 2)
        batch, tokens, _ = x.shape
        # The grid's extra last row is a sink for tokens that have no input position of their own
        # (fused tokens, ragged padding), so every active token can be written back in one scatter.
        grid = torch.cat([x, x.new_zeros(batch, 1, x.shape[-1])], dim=1) if dense else None
        trace = Trace(batch, tokens, prefix, map_size=map_size, input_valid=valid)
        if order is None:
            index = torch.arange(tokens, device=x.device).expand(batch, tokens)
        else:
            index, x = order, gather_tokens(x, order)
            valid = None if valid is None else valid.gather(1, order)
        if valid is not None and not bool(valid[:, :prefix].all()):
            raise ValueError(f"the first {prefix} token(s) are protected from pruning and must not be "
                             "padding: pad sequences on the right")
        return cls(x=x, index=index, prefix=prefix, valid=valid, grid=grid, trace=trace, map_size=map_size)

    @property
    def tokens(self) -> int:
        return self.x.shape[1]

    def patch_counts(self) -> int | Tensor:
        """Non-prefix tokens per sample: an int, or [B] for a ragged batch."""
        if self.valid is None:
            return self.tokens - self.prefix
        return self.valid[:, self.prefix :].sum(dim=1)

    def token_counts(self) -> int | Tensor:
        """Tokens per sample, prefix included: an int, or [B] for a ragged batch."""
        counts = self.patch_counts()
        return counts + self.prefix

    def replace(self, **changes) -> TokenState:
        """A copy with `changes` applied. Called several times per block, so it copies the fields
        directly: dataclasses.replace re-runs __init__, about three times slower (measured)."""
        unknown = changes.keys() - _STATE_FIELDS
        if unknown:
            raise TypeError(f"TokenState has no field {', '.join(sorted(unknown))}")
        state = object.__new__(type(self))
        state.__dict__.update(self.__dict__)
        state.__dict__.update(changes)
        return state

    def gather(self, kept: Tensor, kept_valid: Tensor | None = None) -> TokenState:
        """Keep the prefix and the non-prefix tokens at `kept` ([B, K], positions after the prefix)."""
        batch = kept.shape[0]
        prefix_positions = torch.arange(self.prefix, device=kept.device).expand(batch, self.prefix)
        positions = torch.cat([prefix_positions, kept + self.prefix], dim=1)
        valid = None
        if kept_valid is not None:
            prefix_valid = torch.ones(batch, self.prefix, dtype=torch.bool, device=kept.device)
            valid = torch.cat([prefix_valid, kept_valid], dim=1)
        return self.select(positions, valid)

    def select(self, positions: Tensor, valid: Tensor | None = None) -> TokenState:
        """Keep the tokens at `positions` ([B, K] over all tokens; the prefix's own positions
        included, first). `valid` [B, K] marks the rows of a ragged selection that are padding."""
        if self.source is not None:
            raise ValueError("tokens cannot be dropped after they were merged in dense mode")
        index = self.index.gather(1, positions)
        if valid is not None:
            index = index.masked_fill(~valid, NO_POSITION)  # padding rows stand for no position
        return self.replace(
            x=gather_tokens(self.x, positions),
            index=index,
            size=None if self.size is None else self.size.gather(1, positions),
            valid=valid,
            keep=None if self.keep is None else self.keep.gather(1, positions),
            grid=self.stored_grid(),  # dropped tokens keep the features they have now
        )

    def stored_grid(self) -> Tensor | None:
        """Dense mode: the grid with the active tokens' current features written at their positions."""
        if self.grid is None:
            return None
        # Padding of the input (padded text) has a position and is written back, as the host computes
        # it too; padding rows of a ragged selection have none (`gather` marks them) and go to the sink.
        has_position = self.index >= 0
        positions = torch.where(has_position, self.index, self.grid.shape[1] - 1)  # else: the sink row
        return scatter_tokens(self.grid, positions, self.x)

    def dense_output(self) -> Tensor:
        """Dense mode: every input token in input order [B, N0, C], pruned ones with their last
        features, merged ones with the features of the token they were merged into; in the input's
        own layout [B, rows, cols, C] when the blocks take maps."""
        merged = self.source is not None
        tokens = gather_tokens(self.x, self.source) if merged else self.stored_grid()[:, :-1]
        if self.map_size is None:
            return tokens
        return tokens.reshape(tokens.shape[0], *self.map_size, tokens.shape[-1])

    def sources(self) -> Tensor:
        """Dense mode: the active slot [B, N0] of every input token (merging keeps no one-to-one map)."""
        if self.source is not None:
            return self.source
        if self.grid is None or self.tokens != self.grid.shape[1] - 1 or self.valid is not None:
            raise ValueError("merging in dense mode needs every input token still active")
        return self.index

    def fuse_rest(self, kept: Tensor, weights: Tensor, kept_valid: Tensor | None = None) -> TokenState:
        """Keep the tokens at `kept` and fuse all other non-prefix tokens into one appended token.

        The fused token is the `weights`-weighted average of the tokens it replaces. In a ragged batch
        (`kept_valid` from `ops.select_by_count`), padding is never fused, and a sample that keeps all
        its tokens gets a fused token marked as padding.
        """
        if (self.valid is None) != (kept_valid is None):
            raise ValueError("a ragged batch fuses with the validity of its kept tokens, and only it does")
        rest_weights = weights
        if kept_valid is None:
            rest_weights = rest_weights.scatter(1, kept, 0.0)  # [B, Np], zero on the kept tokens
        else:
            rest_weights = rest_weights * self.valid[:, self.prefix :]
            kept_weights = rest_weights.gather(1, kept).masked_fill(kept_valid, 0.0)  # padding rows: not kept
            rest_weights = rest_weights.scatter(1, kept, kept_weights)
        total = rest_weights.sum(dim=1)
        fused = torch.bmm(rest_weights[:, None], self.x[:, self.prefix :])  # [B, 1, C]
        return self.gather(kept, kept_valid)._append_fused(fused, total, self.size)

    def select_and_fuse(self, positions: Tensor, weights: Tensor) -> TokenState:
        """Keep the tokens at `positions` ([B, K] over all tokens, the prefix's own first) and fuse
        all others into one appended token, their `weights`-weighted average. `weights` [B, N] covers
        every token; the entries at `positions` are not read. The fast path of an equal-count batch:
        one selection, no index arithmetic."""
        if self.valid is not None:
            raise ValueError("a ragged batch fuses through fuse_rest, with the validity of its kept tokens")
        rest_weights = weights.scatter(1, positions, 0.0)  # [B, N], zero on the kept tokens
        fused = torch.bmm(rest_weights[:, None], self.x)  # [B, 1, C]
        return self.select(positions)._append_fused(fused, rest_weights.sum(dim=1), self.size)

    def _append_fused(self, weighted_sum: Tensor, total: Tensor, size_before: Tensor | None) -> TokenState:
        """This state with one more token, `weighted_sum` [B, 1, C] / `total` [B]; a sample whose
        total is 0 fused nothing, and in a ragged batch its fused row is padding."""
        fused = weighted_sum / total[:, None, None].clamp_min(torch.finfo(weighted_sum.dtype).tiny)
        fused_index = self.index.new_full((self.x.shape[0], 1), FUSED_TOKEN_INDEX)
        valid = None if self.valid is None else torch.cat([self.valid, (total > 0)[:, None]], dim=1)
        size = None
        if size_before is not None:  # the fused token stands for every input token not kept
            rest_size = (size_before[:, self.prefix :].sum(dim=1, keepdim=True)
                         - self.size[:, self.prefix :].sum(dim=1, keepdim=True))
            size = torch.cat([self.size, rest_size], dim=1)
        return self.replace(
            x=torch.cat([self.x, fused], dim=1),
            index=torch.cat([self.index, fused_index], dim=1),
            size=size,
            valid=valid,
        )


def _check_map_input(x: Tensor, prefix: int, dense: bool) -> tuple[int, int]:
    """(rows, cols) of a [B, rows, cols, C] block input, which only dense runs can hand back whole."""
    if prefix:
        raise ValueError("a block input shaped as a [B, rows, cols, C] map cannot carry prefix tokens")
    if not dense:
        raise ValueError("blocks that take [B, rows, cols, C] maps must give back the whole map; "
                         "patch with dense=True")
    return x.shape[1], x.shape[2]


_STATE_FIELDS = frozenset(f.name for f in dataclasses.fields(TokenState))


def gather_tokens(x: Tensor, positions: Tensor) -> Tensor:
    """x[b, positions[b]] for every sample: [B, N, C] x [B, K] -> [B, K, C].

    Copies whole rows of the flattened batch, much faster than an element-wise gather.
    """
    batch, tokens, channels = x.shape
    if batch == 1:  # one sample: the positions are the rows
        return x.index_select(1, positions[0])
    rows = positions + torch.arange(batch, device=x.device)[:, None] * tokens
    return x.reshape(batch * tokens, channels).index_select(0, rows.flatten()).view(batch, -1, channels)


def scatter_tokens(grid: Tensor, positions: Tensor, tokens: Tensor) -> Tensor:
    """A copy of `grid` [B, N, C] with `tokens` [B, K, C] written at `positions` [B, K]."""
    return grid.scatter(1, positions.unsqueeze(-1).expand(-1, -1, grid.shape[-1]), tokens)


def repeat_by_size(state: TokenState) -> Tensor:
    """Each token repeated `size` times: [B, N, C] -> [B, T, C], T the input token count.

    Means and maxima over the result equal size-weighted means and maxima over the merged
    tokens, so a host head that pools over tokens pools correctly without knowing of merging.
    """
    batch, tokens, channels = state.x.shape
    counts = state.size.round().long().flatten()
    source = torch.repeat_interleave(torch.arange(batch * tokens, device=state.x.device), counts)
    return state.x.reshape(batch * tokens, channels)[source].view(batch, -1, channels)

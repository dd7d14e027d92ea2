"""TokenState, the one object that flows through a pruned model, and the primitives on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
    # Positions [B, N] (and ragged validity) of the tokens that entered attention, when the block's
    # view ran attention itself (windows, relative positions): its MACs depend on where they sit,
    # and are counted from these when asked (`flops`), not on the forward's path.
    attention_index: Tensor | None = None
    attention_valid: Tensor | None = None


@dataclass
class KeepDecision:
    """A differentiable keep decision of mask-mode training, with the share it aims for."""

    layer: int
    decisions: Tensor  # [B, N - prefix] 0/1 per non-prefix token, carrying gradient
    target: float  # share of the input tokens the method means to keep here
    ratio_loss: bool = True  # False: the method weighs these decisions in a loss of its own (SViT)


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
    module: int = 0  # which of its handle's patched modules ran (e.g. 0: image tower, 1: text tower)
    reports: dict[str, Any] = field(default_factory=dict)  # what the method's run reported, for its losses

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

    def add_keep_decision(self, decisions: Tensor, target: float, ratio_loss: bool = True) -> None:
        """Record a mask-mode decision of the block being run: for the kept-rate log, and for the
        keep-ratio loss unless `ratio_loss` is False (a method that weighs its decisions itself)."""
        self.keep_decisions.append(KeepDecision(self.layers[-1].layer, decisions, target, ratio_loss))

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
    # (x, index, grid) when `grid` holds `x` at `index` (written back, or `x` read from it): writing
    # back again would copy the same rows. Compared by identity, so a state whose tokens, positions
    # or grid were replaced since writes back.
    synced: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def start(cls, x: Tensor, prefix: int, grid: bool = False, valid: Tensor | None = None,
              order: Tensor | None = None) -> TokenState:
        """The state entering the first block: `x` is [B, N, C] tokens, or a [B, rows, cols, C] map.
        With `grid`, the state keeps the last features of every input position (dense output, and
        methods that work on the whole grid).
        `valid` [B, N] marks the input's padding (False), which is never attended as a key; `order`
        [B, N] lists input positions in the order the state holds them (a host whose pooled token
        is not first puts it first, so it can score the others)."""
        map_size = None
        if x.dim() == 4:
            map_size = _check_map_input(x, prefix, grid)
            x = x.flatten(1, 2)
        batch, tokens, _ = x.shape
        # The grid's extra last row is a sink for tokens that have no input position of their own
        # (fused tokens, ragged padding), so every active token can be written back in one scatter.
        grid_tensor = torch.cat([x, x.new_zeros(batch, 1, x.shape[-1])], dim=1) if grid else None
        trace = Trace(batch, tokens, prefix, map_size=map_size, input_valid=valid)
        if order is None:
            index = torch.arange(tokens, device=x.device).expand(batch, tokens)
        else:
            index, x = order, gather_tokens(x, order)
            valid = None if valid is None else valid.gather(1, order)
        if valid is not None and not bool(valid[:, :prefix].all()):
            raise ValueError(f"the first {prefix} token(s) are protected from pruning and must not be "
                             "padding: pad sequences on the right")
        return cls(x=x, index=index, prefix=prefix, valid=valid, grid=grid_tensor, trace=trace,
                   map_size=map_size)

    @property
    def tokens(self) -> int:
        return self.x.shape[1]

    def patch_counts(self) -> int | Tensor:
        """Non-prefix tokens per sample: an int, or [B] for a ragged batch."""
        if self.valid is None:
            return self.tokens - self.prefix
        return self.valid[:, self.prefix :].sum(dim=1)

    def patch_valid(self) -> Tensor | None:
        """[B, N - prefix] False on the non-prefix rows that are padding; None: none are."""
        return None if self.valid is None else self.valid[:, self.prefix :]

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

    def select(self, slots: Tensor, valid: Tensor | None = None) -> TokenState:
        """Keep the tokens at `slots` [B, K]: positions in the current token sequence, the prefix's
        own first (as `ops.keep_top` gives them). `valid` [B, K] marks the padding rows of a ragged
        selection. In a state with a grid, the tokens dropped keep their current features there."""
        if self.source is not None:
            raise ValueError("tokens cannot be dropped after they were merged in dense mode")
        index = self.index.gather(1, slots)
        if valid is not None:
            index = index.masked_fill(~valid, NO_POSITION)  # padding rows stand for no position
        return self.replace(
            x=gather_tokens(self.x, slots),
            index=index,
            size=None if self.size is None else self.size.gather(1, slots),
            valid=valid,
            keep=None if self.keep is None else self.keep.gather(1, slots),
            grid=self.written_grid(),
        )

    def fuse_rest(self, slots: Tensor, weights: Tensor, valid: Tensor | None = None,
                  normalized: bool = False) -> TokenState:
        """Keep the tokens at `slots` (as `select`) and fuse every other non-prefix token into one
        token appended after them: their sum weighted by `weights` [B, N - prefix] (one weight per
        non-prefix token), not divided by the weights' sum, as EViT fuses the inattentive tokens by
        their class attention (`normalized`: divided by their sum over the fused tokens, MADTP's
        weighted mean). Padding is never fused; a sample of a ragged selection that keeps all its
        tokens gets a fused row marked as padding."""
        patch_valid = self.patch_valid()
        rest = torch.ones_like(weights) if patch_valid is None else patch_valid.to(weights.dtype)
        kept = slots[:, self.prefix :] - self.prefix
        # Take the kept tokens out; a ragged selection's padding rows point at tokens not kept.
        kept_rest = 0.0 if valid is None else rest.gather(1, kept).masked_fill(valid[:, self.prefix :], 0.0)
        rest = rest.scatter(1, kept, kept_rest)  # [B, N - prefix] 1 on the tokens to fuse
        weights = weights * rest
        if normalized:
            weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-8)
        fused = torch.bmm(weights.to(self.x.dtype)[:, None], self.x[:, self.prefix :])  # [B, 1, C]
        return self.select(slots, valid)._append_fused(fused, rest.sum(dim=1) > 0, self.size)

    def activate(self, positions: Tensor, valid: Tensor | None = None) -> TokenState:
        """Make the tokens at input `positions` [B, K] (the prefix's own first) the active set. The
        active tokens' features are written back into the grid and the new set is read from it, so a
        token frozen by an earlier step comes back with the features it had then. `valid` [B, K]
        marks padding rows (their position is not read). Needs a grid (`Method.uses_grid`)."""
        if self.grid is None:
            raise ValueError("activating tokens by position needs the token grid: declare uses_grid = True "
                             "on the method")
        if self.size is not None or self.keep is not None:
            raise ValueError("activate works on dropped tokens only: not after merging, not in mask mode "
                             "(where every token stays active and `keep` decides)")
        grid = self.written_grid()
        rows = positions if valid is None else positions.masked_fill(~valid, grid.shape[1] - 1)
        x = gather_tokens(grid, rows)
        index = positions if valid is None else positions.masked_fill(~valid, NO_POSITION)
        return self.replace(x=x, index=index, valid=valid, grid=grid, synced=(x, index, grid))

    def write_back(self) -> TokenState:
        """This state with its grid holding the active tokens' current features (`written_grid`),
        marked so that a later step on the same tokens does not write them again."""
        if self.grid is None or self._synced():
            return self
        grid = self.written_grid()
        return self.replace(grid=grid, synced=(self.x, self.index, grid))

    def written_grid(self) -> Tensor | None:
        """The grid with the active tokens' current features written at their positions; in place
        when no gradient is recorded (no copy of the grid), else a new tensor autograd can follow."""
        if self.grid is None or self._synced():
            return self.grid
        # Padding of the input (padded text) has a position and is written back, as the host computes
        # it too; rows with no position (fused tokens, ragged padding) go to the sink row.
        rows = torch.where(self.index >= 0, self.index, self.grid.shape[1] - 1)
        return write_tokens(self.grid, rows, self.x)

    def _synced(self) -> bool:
        if self.synced is None:
            return False
        x, index, grid = self.synced
        return x is self.x and index is self.index and grid is self.grid

    def dense_output(self, copy: bool = False) -> Tensor:
        """Dense mode: every input token in input order [B, N0, C], pruned ones with their last
        features, merged ones with the features of the token they were merged into; in the input's
        own layout [B, rows, cols, C] when the blocks take maps. With `copy`, never a view of the
        grid (whose owner writes it in place again)."""
        if self.source is not None:
            tokens = gather_tokens(self.x, self.source)
        else:
            grid = self.written_grid()
            tokens = (grid.clone() if copy else grid)[:, :-1]
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

    def _append_fused(self, fused: Tensor, fused_any: Tensor, size_before: Tensor | None) -> TokenState:
        """This state with the token `fused` [B, 1, C] appended; in a ragged batch, the fused row of a
        sample that fused nothing (`fused_any` [B] False) is padding."""
        fused_index = self.index.new_full((self.x.shape[0], 1), FUSED_TOKEN_INDEX)
        valid = None if self.valid is None else torch.cat([self.valid, fused_any[:, None]], dim=1)
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


def _check_map_input(x: Tensor, prefix: int, grid: bool) -> tuple[int, int]:
    """(rows, cols) of a [B, rows, cols, C] block input, which only dense runs can hand back whole."""
    if prefix:
        raise ValueError("a block input shaped as a [B, rows, cols, C] map cannot carry prefix tokens")
    if not grid:
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


def write_tokens(grid: Tensor, positions: Tensor, tokens: Tensor) -> Tensor:
    """`grid` [B, N, C] with `tokens` [B, K, C] written at `positions` [B, K]: in place when no
    gradient is recorded through either, else a copy."""
    rows = positions.unsqueeze(-1).expand(-1, -1, grid.shape[-1])
    if torch.is_grad_enabled() and (grid.requires_grad or tokens.requires_grad):
        return grid.scatter(1, rows, tokens)
    return grid.scatter_(1, rows, tokens)


def repeat_by_size(state: TokenState) -> Tensor:
    """Each token repeated `size` times: [B, N, C] -> [B, T, C], T the input token count.

    Means and maxima over the result equal size-weighted means and maxima over the merged
    tokens, so a host head that pools over tokens pools correctly without knowing of merging.
    """
    batch, tokens, channels = state.x.shape
    counts = state.size.round().long().flatten()
    source = torch.repeat_interleave(torch.arange(batch * tokens, device=state.x.device), counts)
    return state.x.reshape(batch * tokens, channels)[source].view(batch, -1, channels)

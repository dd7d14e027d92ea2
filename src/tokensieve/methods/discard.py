"""Discarding pruned tokens on a dense host: their cells of the returned map are left empty.

A dense-prediction host needs a value at every position. Methods that preserve pruned tokens
(SViT's default, every method in dense mode) leave there the feature a token had when it was
pruned; the discarding variant (DynamicViT as its authors run it, SViT's `preserve=False`
ablation) leaves zeros, so the head sees only what went the whole way."""

from __future__ import annotations

import torch

from tokensieve.tokens import TokenState


def discard_dropped(state: TokenState) -> TokenState:
    """`state` with the features of every token no longer active zeroed in its map (before the
    final norm); unchanged when there is no map (sparse output)."""
    if state.grid is None:
        return state
    if state.keep is not None:  # mask mode: a dropped token leaves the map through its decision
        return state.replace(x=state.x * state.keep[..., None].to(state.x.dtype))
    grid = state.written_grid()
    rows = torch.where(state.index >= 0, state.index, grid.shape[1] - 1)  # padding: the spare row
    active = grid.new_zeros(grid.shape[:2]).scatter_(1, rows, 1.0)  # [B, N0 + 1]
    return state.replace(grid=grid * active[..., None])

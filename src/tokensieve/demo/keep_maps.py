"""Which tokens a patched reference model kept: read from the trace of one forward, per block
and per sample, for the image tower (grid cells) and, on nlvr and retrieval, the text tower (word
positions)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

import tokensieve as ts
from tokensieve.reference.evaluation import predict
from tokensieve.reference.patching import image_encoder, text_encoder
from tokensieve.reference.recipes.batches import VL_TASKS
from tokensieve.tokens import LayerRecord, Trace


@dataclass
class KeptTokens:
    """Per block shown, per sample: the image cells (row-major over the `grid` × `grid` patches)
    and text positions (0 is the text's start token, word i sits at i + 1) that ran that block as
    tokens of their own. A merged token (ToMe's, MADTP's fused one) counts for the token it was
    merged into; an unpatched tower keeps everything (`text` then holds no block)."""

    grid: int
    image: dict[int, list[set[int]]] = field(default_factory=dict)
    text: dict[int, list[set[int]]] = field(default_factory=dict)


@torch.no_grad()
def kept_tokens(model: nn.Module, task: str, batch: dict, blocks: tuple[int, ...],
                text_blocks: tuple[int, ...] = ()) -> KeptTokens:
    """The tokens `model` (a reference model patched with a method) kept in `blocks` of its image
    tower and `text_blocks` of its text tower, in one forward of `batch` as scoring runs it."""
    towers = [image_encoder(model)]
    if task in VL_TASKS and ts.is_patched(text_encoder(model)):
        towers.append(text_encoder(model))
    with contextlib.ExitStack() as stack:
        found = [stack.enter_context(ts.trace(tower)) for tower in towers]
        predict(model, task, batch)
    collected: dict[int, Trace] = {}  # by tower: 0 image, 1 text (towers patched together trace both)
    for trace in (trace for traces in found for trace in traces):
        collected.setdefault(trace.module, trace)
    image = collected[0]
    grid = round((image.input_tokens - image.prefix) ** 0.5)
    kept = KeptTokens(grid, {block: _positions(image.layers[block], image.prefix) for block in blocks})
    if 1 in collected:
        kept.text = {block: _positions(collected[1].layers[block], 0) for block in text_blocks}
    return kept


def _positions(record: LayerRecord, prefix: int) -> list[set[int]]:
    """Each sample's input positions (less `prefix`) of the tokens that ran the block."""
    index = record.index.cpu()
    valid = torch.ones_like(index, dtype=torch.bool) if record.valid is None else record.valid.cpu()
    return [{int(p) - prefix for p in index[b][valid[b] & (index[b] >= prefix)]}
            for b in range(index.shape[0])]

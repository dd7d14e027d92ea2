"""SAM's image encoder: windowed and global attention with relative positions, over pruned maps."""

from __future__ import annotations

import pytest
import torch
from flop_counting import counted_macs
from models import (
    DEPTH,
    IMAGE,
    PATCH,
    SAM_CHANNELS,
    SAM_GLOBAL_LAYERS,
    calibrate_predictors,
    images,
    sam_model,
)
from registry import REGISTRY, SAM, given, methods
from torch import Tensor, nn

import tokensieve as ts
from tokensieve.hosts import hf_sam

TOLERANCE = 1e-5
GRID = IMAGE // PATCH
PRUNED = ts.DynamicViT(keep=0.5, layers=(1, 2))  # prunes before a global and a windowed layer


def _embeddings(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


# --- pruning off: the host's output ---------------------------------------------------------


@pytest.mark.parametrize("method", methods("off", host=SAM))
@pytest.mark.parametrize("class_name", ["SamVisionEncoder", "SamVisionModel"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_patched_sam_encoder_with_pruning_off_equals_host(class_name, attention, method):
    model = sam_model(class_name)
    x = images(2)
    expected = _embeddings(model, x)
    ts.patch(model, method, attention=attention)
    with given(model, 2):
        assert (_embeddings(model, x) - expected).abs().max() <= TOLERANCE


VARIANTS = {
    "no-relative-positions": dict(use_rel_pos=False),
    "map-of-whole-windows": dict(window_size=4),
    "window-larger-than-the-map": dict(window_size=14),
    "global-only": dict(global_attn_indexes=tuple(range(DEPTH))),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_patched_sam_encoder_variants_with_pruning_off_equal_host(overrides):
    model = sam_model(**overrides)
    x = images(2)
    expected = _embeddings(model, x)
    ts.patch(model, ts.DynamicViT(keep=1.0, layers=(1, 2)))
    assert (_embeddings(model, x) - expected).abs().max() <= TOLERANCE


def test_patched_sam_model_vision_encoder_gives_the_hosts_image_embeddings_and_masks():
    model = sam_model("SamModel")
    x = images(2)
    points = torch.tensor([[[[20.0, 30.0]]], [[[50.0, 10.0]]]])  # one point per image, in pixels
    with torch.no_grad():
        expected_embeddings = model.get_image_embeddings(x)
        expected_masks = model(pixel_values=x, input_points=points).pred_masks
    ts.patch(model.vision_encoder, ts.DynamicViT(keep=1.0, layers=(1, 2)))
    with torch.no_grad():
        embeddings = model.get_image_embeddings(x)
        masks = model(pixel_values=x, input_points=points).pred_masks
    assert embeddings.shape == (2, SAM_CHANNELS, GRID, GRID)
    assert (embeddings - expected_embeddings).abs().max() <= TOLERANCE
    assert (masks - expected_masks).abs().max() <= 1e-4  # the mask decoder amplifies rounding


@pytest.mark.fullsize
def test_patched_mid_size_sam_encoder_with_pruning_off_equals_host():
    # ViT-B's width, heads, window and global layers on a 256x256 image: the 16x16 map is padded
    # to 28x28 for windows of 14, so padding cells are most of the windows' keys.
    model = sam_model("SamVisionEncoder", image_size=256, patch_size=16, hidden_size=768,
                      num_attention_heads=12, num_hidden_layers=4, window_size=14,
                      global_attn_indexes=(1, 3), output_channels=256, initializer_range=0.02)
    x = images(1, 256, 256)
    expected = _embeddings(model, x)
    ts.patch(model, ts.DynamicViT(keep=1.0, layers=(1, 2)))
    assert (_embeddings(model, x) - expected).abs().max() <= TOLERANCE


# --- pruned: attention over the active tokens of each window ------------------------------------


def reference_encoder(encoder: nn.Module, x: Tensor, active: list[list[Tensor]],
                      padding_keys: bool = True) -> Tensor:
    """SAM's image encoder written out plainly, one sample, layer and window at a time: at layer
    i, only the cells `active[i][b]` of sample b attend (to the active cells of their window and
    the window's zero-padding cells) and are updated; every other cell keeps its features."""
    with torch.no_grad():
        maps = encoder.patch_embed(x) + encoder.pos_embed  # [B, H, W, C]
        batch, rows, cols, channels = maps.shape
        out = []
        for b in range(batch):
            cells = maps[b].reshape(rows * cols, channels)
            for layer, positions in zip(encoder.layers, active, strict=True):
                cells = _reference_layer(layer, cells, positions[b].tolist(), rows, cols, padding_keys)
            out.append(cells.reshape(rows, cols, channels))
        return encoder.neck(torch.stack(out))


def _reference_layer(layer: nn.Module, cells: Tensor, active: list[int], rows: int, cols: int,
                     padding_keys: bool) -> Tensor:
    size = layer.window_size
    groups = [(r, c) for r in range(0, rows, size) for c in range(0, cols, size)] if size else [(0, 0)]
    span = size or rows  # square maps: the global tables span the map
    updated = cells.clone()
    for top, left in groups:
        window = [(r, c) for r in range(top, top + span) for c in range(left, left + span)]
        queries = [(r, c) for r, c in window if r < rows and c < cols and r * cols + c in active]
        if not queries:
            continue
        padding = [(r, c) for r, c in window if r >= rows or c >= cols] if padding_keys else []
        members = queries + padding
        positions = torch.tensor([r * cols + c for r, c in queries])
        normed = layer.layer_norm1(cells[positions])
        normed = torch.cat([normed, normed.new_zeros(len(padding), normed.shape[1])])
        out = _reference_attention(layer.attn, normed, members, span)[: len(queries)]
        updated[positions] = cells[positions] + layer.attn.proj(out)
    active = torch.tensor(active)
    updated[active] = updated[active] + layer.mlp(layer.layer_norm2(updated[active]))
    return updated


def _reference_attention(attn: nn.Module, normed: Tensor, members: list[tuple[int, int]],
                         span: int) -> Tensor:
    """Attention among `members` (absolute (row, col) cells) with SAM's decomposed relative positions."""
    heads = attn.num_attention_heads
    q, k, v = attn.qkv(normed).view(len(members), 3, heads, -1).unbind(1)  # [n, H, d]
    local = torch.tensor([(r % span, c % span) for r, c in members])
    row_offsets = local[:, None, 0] - local[None, :, 0] + span - 1  # [n, n] index into the tables
    col_offsets = local[:, None, 1] - local[None, :, 1] + span - 1
    outputs = []
    for h in range(heads):
        logits = attn.scale * q[:, h] @ k[:, h].T
        logits = logits + torch.einsum("id,ijd->ij", q[:, h], attn.rel_pos_h[row_offsets])
        logits = logits + torch.einsum("id,ijd->ij", q[:, h], attn.rel_pos_w[col_offsets])
        outputs.append(logits.softmax(dim=-1) @ v[:, h])
    return torch.cat(outputs, dim=-1)


def _active_cells(trace: ts.Trace) -> list[list[Tensor]]:
    """[layer][sample] the map cells that went through each layer."""
    cells = []
    for record in trace.layers:
        per_sample = [record.index[b] if record.valid is None else record.index[b][record.valid[b]]
                      for b in range(trace.batch)]
        cells.append(per_sample)
    return cells


@pytest.mark.parametrize("share", [0.0, 0.9, 1.0], ids=["one-padded-batch", "default", "equal-counts"])
@pytest.mark.parametrize("method", [PRUNED, ts.DynamicViT(keep=0.5, layers=(1, 2), dynamic=True)],
                         ids=["fixed-keep", "ragged"])
def test_pruned_sam_encoder_equals_a_plain_window_by_window_reference(method, share, monkeypatch):
    # `share` 0 runs a layer's windows in batches padded to their largest: padded keys masked
    monkeypatch.setattr(hf_sam, "_WINDOW_BATCH_SHARE", share)
    monkeypatch.setattr(hf_sam, "_WINDOWS_PER_BATCH", 3)  # and several batches of the same count
    model = sam_model()
    x = images(2)
    dense = _embeddings(model, x)
    ts.patch(model, method)
    if method.dynamic:
        calibrate_predictors(model, x)
    with ts.trace(model) as traces:
        pruned = _embeddings(model, x)
    active = _active_cells(traces[0])
    kept = [len(cells) for cells in active[2]]
    assert max(kept) < GRID * GRID  # the windowed layer 2 ran on a pruned map
    if method.dynamic:  # a ragged batch: the images kept different counts at some layer
        assert any(len({len(cells) for cells in layer}) > 1 for layer in active)
    torch.testing.assert_close(pruned, reference_encoder(model, x, active), atol=TOLERANCE, rtol=0)
    assert (pruned - dense).abs().max() > 1e-2  # pruning changed the embeddings
    # The host's zero-padding cells are keys of the windows at the map's edge.
    assert (pruned - reference_encoder(model, x, active, padding_keys=False)).abs().max() > 1e-3


def test_pruned_sam_encoder_with_eager_attention_equals_the_fused_one():
    model = sam_model()
    x = images(2)
    sieve = ts.patch(model, PRUNED)
    fused = _embeddings(model, x)
    ts.patch(model, PRUNED, attention="eager").load_state_dict(sieve.state_dict())
    torch.testing.assert_close(_embeddings(model, x), fused, atol=TOLERANCE, rtol=0)


def test_windows_are_batched_from_the_largest_count_down_by_share_and_size():
    counts = [85, 0, 158, 78, 61, 164, 161, 190]
    assert hf_sam._window_batches(counts, 0.9, 16) == [[7], [5, 6, 2], [0, 3], [4]]
    assert hf_sam._window_batches(counts, 0.9, 2) == [[7], [5, 6], [2], [0, 3], [4]]
    assert hf_sam._window_batches(counts, 1.0, 16) == [[7], [5], [6], [2], [0], [3], [4]]
    assert hf_sam._window_batches(counts, 0.0, 16) == [[7, 5, 6, 2, 0, 3, 4]]
    assert hf_sam._window_batches([0, 0], 0.9, 16) == []


def test_reference_with_every_cell_active_equals_host():
    model = sam_model()
    x = images(2)
    everything = [[torch.arange(GRID * GRID)] * 2] * DEPTH
    torch.testing.assert_close(reference_encoder(model, x, everything), _embeddings(model, x),
                               atol=TOLERANCE, rtol=0)


def test_cells_pruned_before_the_last_layer_reach_the_neck_with_the_previous_layers_output():
    model = sam_model()
    x = images(2)
    with torch.no_grad():  # the host's map entering the last layer
        previous = model.patch_embed(x) + model.pos_embed
        for layer in model.layers[:-1]:
            previous = layer(previous)
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(DEPTH - 1,)))
    neck_inputs = []
    handle = model.neck.register_forward_pre_hook(lambda module, args: neck_inputs.append(args[0]))
    with ts.trace(model) as traces:
        _embeddings(model, x)
    handle.remove()
    assert neck_inputs[0].shape == previous.shape == (2, GRID, GRID, 32)
    for b, kept in enumerate(traces[0].layers[-1].index):
        pruned = torch.ones(GRID * GRID, dtype=torch.bool)
        pruned[kept] = False
        assert 0 < pruned.sum() < GRID * GRID
        neck_input, before = neck_inputs[0][b].flatten(0, 1), previous[b].flatten(0, 1)
        torch.testing.assert_close(neck_input[pruned], before[pruned], atol=TOLERANCE, rtol=0)
        assert (neck_input[~pruned] - before[~pruned]).abs().amin(dim=1).min() > 0  # these went on


# --- dense mode, methods, errors ----------------------------------------------------------------


def test_sam_encoder_always_runs_dense_and_gives_the_neck_a_full_map():
    model = sam_model()
    ts.patch(model, PRUNED, dense=False)  # dense anyway: the neck needs every cell
    assert ts.sieve_of(model).runner.dense
    out = _embeddings(model, images(3))
    assert out.shape == (3, SAM_CHANNELS, GRID, GRID) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", [pytest.param(entry.pruned, id=entry.name)
                                    for entry in REGISTRY if entry.class_attention])
def test_class_attention_methods_on_sam_are_refused_naming_dynamicvit(method):
    with pytest.raises(ValueError, match="DynamicViT"):
        ts.patch(sam_model(), method)


@pytest.mark.parametrize("method", [pytest.param(entry.pruned, id=entry.name) for entry in REGISTRY
                                    if entry.fuses and not entry.class_attention])
def test_token_merging_on_sam_is_refused(method):
    with pytest.raises(ValueError, match=r"merges tokens.*needs the features of every position"):
        ts.patch(sam_model(), method)


def test_whole_sam_model_is_refused_naming_its_vision_encoder():
    with pytest.raises(TypeError, match=r"ts.patch\(model.vision_encoder, method\)"):
        ts.patch(sam_model("SamModel"), PRUNED)


def test_mask_mode_training_reaches_the_predictors_through_windowed_attention():
    model = sam_model().train()
    sieve = ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    out = model(pixel_values=images(2)).last_hidden_state
    assert out.shape == (2, SAM_CHANNELS, GRID, GRID)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sieve.parameters())


def test_unpatch_restores_the_sam_encoder():
    model = sam_model()
    x = images(2)
    expected = _embeddings(model, x)
    keys = list(model.state_dict())
    ts.patch(model, PRUNED)
    assert list(model.state_dict()) == keys
    assert (_embeddings(model, x) - expected).abs().max() > 1e-2
    ts.unpatch(model)
    assert not any("forward" in layer.__dict__ for layer in model.layers)
    assert torch.equal(_embeddings(model, x), expected)


# --- FLOPs --------------------------------------------------------------------------------------


FLOPS_CASES = [
    pytest.param(ts.Method(), "eager", {}, id="dense-eager"),
    pytest.param(ts.Method(), "sdpa", {}, id="dense-sdpa"),
    *[pytest.param(*param.values, attention, {}, id=f"{param.id}-{attention}")
      for param in methods("pruned", "ragged", host=SAM) for attention in ("eager", "sdpa")],
    pytest.param(PRUNED, "eager", VARIANTS["no-relative-positions"], id="pruned-no-rel-pos"),
    pytest.param(PRUNED, "eager", VARIANTS["map-of-whole-windows"], id="pruned-whole-windows"),
]


@pytest.mark.parametrize(("method", "attention", "overrides"), FLOPS_CASES)
def test_sam_flops_agree_with_flop_counter_mode(method, attention, overrides):
    model = sam_model(**overrides)
    x = images(2)
    ts.patch(model, method, attention=attention)
    with given(model, 2):
        report = ts.flops(model, x)
        counted = counted_macs(model, {"pixel_values": x}, x.shape[0])
    assert report.macs == pytest.approx(counted, rel=0.01)
    if type(method) is not ts.Method:  # a pruning method
        assert report.backbone_macs < 0.8 * report.dense_macs  # the blocks' own, the method's overhead aside
    else:
        assert report.macs == report.dense_macs


def test_sam_flops_count_window_attention_by_window_and_the_neck_as_head():
    model = sam_model()
    report = ts.flops(model, images(1))
    window_layer, global_layer = report.layers[0], report.layers[SAM_GLOBAL_LAYERS[0]]
    # Same linear layers and token count: the windowed layer only differs in its attention products.
    assert window_layer.attention_tokens == global_layer.attention_tokens == GRID * GRID
    width, window_cells = 32, 9
    windows = 9  # the 8x8 map padded to 9x9
    window_attention = 2 * windows * window_cells**2 * width + windows * window_cells * 2 * 3 * width
    global_attention = 2 * (GRID * GRID) ** 2 * width + GRID * GRID * 2 * GRID * width
    assert global_layer.backbone_macs - window_layer.backbone_macs == global_attention - window_attention
    neck = GRID * GRID * (32 * SAM_CHANNELS + SAM_CHANNELS * SAM_CHANNELS * 9)
    blocks = sum(layer.backbone_macs for layer in report.layers)
    embedding = GRID * GRID * 3 * PATCH * PATCH * 32
    assert report.backbone_macs == pytest.approx(blocks + neck + embedding)

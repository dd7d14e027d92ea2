"""VLTP: a pruning decoder guided by a per-call task embedding rates the cells of SAM's map; only the
relevant ones run the later blocks, frozen ones keep their features and are rated again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flop_counting import counted_macs
from models import IMAGE, PATCH, SAM_GLOBAL_LAYERS, images, sam_model
from test_sam import _active_cells, reference_encoder
from torch import Tensor

import tokensieve as ts
from tokensieve.methods.vltp import RELEVANCE_REPORT
from tokensieve.methods.vltp_decoder import PruningDecoder

GRID = IMAGE // PATCH
CELLS = GRID * GRID
WIDTH = 12  # of the guidance
TOLERANCE = 1e-5


def _vltp(**settings) -> ts.VLTP:
    return ts.VLTP(**{"keep": 0.5, "layers": (1, 2), "guidance_width": WIDTH, "width": 16, "heads": 2,
                      **settings})


def _guidance(batch: int, seed: int = 0, tokens: int | None = None) -> Tensor:
    shape = (batch, WIDTH) if tokens is None else (batch, tokens, WIDTH)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _embeddings(model, x: Tensor, guidance: Tensor) -> Tensor:
    with ts.inputs(model, guidance=guidance), torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def _run(model, x: Tensor, guidance: Tensor) -> tuple[Tensor, ts.Trace]:
    with ts.trace(model) as traces:
        out = _embeddings(model, x, guidance)
    return out, traces[0]


def test_default_stages_are_the_global_blocks_with_blocks_after_them():
    model = sam_model()
    sieve = ts.patch(model, _vltp(layers=None), dense=True)
    assert sieve.spec.global_blocks == SAM_GLOBAL_LAYERS == (1, 3)
    assert sieve.method.stages(sieve.spec) == {1: 0.5}  # block 3 is the last: nothing after it to save
    vit_b = sieve.spec.__class__(**{**sieve.spec.__dict__, "depth": 12, "global_blocks": (2, 5, 8, 11)})
    assert list(_vltp(layers=None).stages(vit_b)) == [2, 5, 8]


def test_pruned_encoder_equals_a_plain_reference_with_the_cells_each_stage_kept():
    model = sam_model()
    x, guidance = images(2), _guidance(2)
    with torch.no_grad():
        dense = model(pixel_values=x).last_hidden_state
    sieve = ts.patch(model, _vltp(keep=(0.5, 0.25)), dense=True)
    pruned, trace = _run(model, x, guidance)
    active = _active_cells(trace)
    assert [len(active[layer][0]) for layer in range(4)] == [CELLS, CELLS // 2, CELLS // 4, CELLS // 4]
    torch.testing.assert_close(pruned, reference_encoder(model, x, active), atol=TOLERANCE, rtol=0)
    assert (pruned - dense).abs().max() > 1e-2
    # Each stage keeps the decoder's top-rated cells of the map as it stands before that block.
    decoder = sieve.parts[0]["decoder"]
    for layer, keep in ((1, 0.5), (2, 0.25)):
        with torch.no_grad():
            before = _map_before(model, x, active, layer)
            rated = decoder(before, guidance[:, None])
        expected = rated.topk(int(keep * CELLS), dim=1).indices.sort(dim=1).values
        assert torch.equal(torch.stack(active[layer]), expected)
        reported = next(stage for stage in trace.reports[RELEVANCE_REPORT] if stage.layer == layer)
        torch.testing.assert_close(reported.logits, rated, atol=1e-5, rtol=0)


def _map_before(model, x: Tensor, active: list[list[Tensor]], layer: int) -> Tensor:
    """The map [B, rows, cols, C] entering block `layer`, by the plain reference: its first
    `layer` blocks, and no neck."""
    head = SimpleNamespace(patch_embed=model.patch_embed, pos_embed=model.pos_embed,
                           layers=model.layers[:layer], neck=torch.nn.Identity())
    return reference_encoder(head, x, active[:layer])


def test_a_frozen_cell_comes_back_when_a_later_stage_rates_it_relevant():
    model = sam_model()
    x = images(1)
    ts.patch(model, _vltp(keep=(0.25, 0.5)), dense=True)
    _, trace = _run(model, x, _guidance(1))
    active = _active_cells(trace)
    first, second = set(active[1][0].tolist()), set(active[2][0].tolist())
    assert second - first  # a cell frozen at block 1 runs block 2


def test_the_kept_cells_depend_on_the_guidance():
    model = sam_model()
    x = images(1).expand(2, -1, -1, -1)
    ts.patch(model, _vltp(), dense=True)
    _, trace = _run(model, x, _guidance(2))
    first = _active_cells(trace)[1]
    assert not torch.equal(first[0], first[1])  # one image, two tasks: two kept sets


def test_each_image_gives_what_it_gives_alone_and_guidance_may_be_tokens():
    model = sam_model()
    x, guidance = images(3), _guidance(3, tokens=2)
    ts.patch(model, _vltp(), dense=True)
    together, _ = _run(model, x, guidance)
    for b in range(3):
        alone, _ = _run(model, x[b : b + 1], guidance[b : b + 1])
        torch.testing.assert_close(alone, together[b : b + 1], atol=TOLERANCE, rtol=0)


def test_one_decoder_per_stage_when_not_shared():
    model = sam_model()
    sieve = ts.patch(model, _vltp(shared=False), dense=True)
    assert sorted(sieve.parts[0].keys()) == ["1", "2"]
    out, _ = _run(model, images(2), _guidance(2))
    assert out.shape[0] == 2


def test_a_call_without_guidance_or_with_the_wrong_width_or_rows_is_refused():
    model = sam_model()
    ts.patch(model, _vltp(), dense=True)
    x = images(2)
    with pytest.raises(ValueError, match=r"needs the per-call input 'guidance'"), torch.no_grad():
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"is 5 wide and the method reads 12"):
        _embeddings(model, x, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"has 3 rows and the call has 2 samples"):
        _embeddings(model, x, torch.randn(3, WIDTH))


@pytest.mark.parametrize(("settings", "message"), [
    (dict(guidance_width=None), r"guidance_width=D"),
    (dict(keep=(0.5, 0.4, 0.3)), r"2 stages and 3 keep shares"),
    (dict(layers=(1, 7)), r"layer 7 is past this model's 4 blocks"),
])
def test_bad_settings_are_refused_when_patched(settings, message):
    with pytest.raises(ValueError, match=message):
        ts.patch(sam_model(), _vltp(**settings), dense=True)


def test_a_keep_tuple_is_read_share_by_share():
    assert _vltp(keep=[0.5, 0.25]).keep == (0.5, 0.25)
    with pytest.raises(ValueError, match=r"VLTP\(keep="):
        _vltp(keep=(0.5, 1.5))
    with pytest.raises(TypeError, match=r"VLTP\(keep="):
        _vltp(keep=())


def test_hosts_without_an_image_map_are_refused_naming_alternatives():
    from models import host_model

    with pytest.raises(ValueError, match=r"use SViT or DynamicViT"):
        ts.patch(host_model("timm-vit"), _vltp())


def test_decoder_macs_are_what_torchs_counter_counts():
    decoder = PruningDecoder(dim=32, guidance_width=WIDTH, width=16, heads=2).eval()
    features, guidance = torch.randn(2, 5, 7, 32), torch.randn(2, 3, WIDTH)
    with torch.no_grad():
        first = decoder(features, guidance)  # makes the map size's position features, once
    counted = counted_macs(decoder, {"features": features, "guidance": guidance}, batch=2)
    assert decoder.macs(cells=35, guidance_tokens=3) == pytest.approx(counted, rel=1e-6)
    with torch.no_grad():
        assert torch.equal(decoder(features, guidance), first)


def test_flops_count_the_decoder_as_overhead_at_each_stage():
    model = sam_model()
    sieve = ts.patch(model, _vltp(), dense=True)
    with ts.inputs(model, guidance=_guidance(2)):
        report = ts.flops(model, images(2))
    decoder = sieve.parts[0]["decoder"]
    assert report.overhead == {"decoder": pytest.approx(2 * decoder.macs(CELLS, 1))}
    assert report.macs < report.dense_macs


def test_mask_mode_keeps_the_inference_cells_and_trains_the_decoder_through_the_pruned_forward():
    model = sam_model()
    x, guidance = images(2), _guidance(2)
    sieve = ts.patch(model, _vltp(keep=(0.5, 0.25)), dense=True)
    _, trace = _run(model, x, guidance)
    inference = _active_cells(trace)
    model.train()
    target = torch.zeros(2, IMAGE, IMAGE)
    target[:, : IMAGE // 2] = 1.0  # the top half of each image is the task's object
    with ts.inputs(model, guidance=guidance, target_mask=target), ts.trace(model) as traces:
        out = model(pixel_values=x).last_hidden_state
    decisions = [decision.decisions for decision in traces[0].keep_decisions]
    for stage, decision in zip((1, 2), decisions, strict=True):
        kept = decision.detach().nonzero()[:, 1].view(2, -1)
        assert torch.equal(kept, torch.stack(inference[stage]))
    # the task's loss alone reaches the decoder (through the straight-through decisions)
    out.square().mean().backward(retain_graph=True)
    decoder = sieve.parts[0]["decoder"]
    assert decoder.query.grad is not None and decoder.query.grad.abs().sum() > 0
    losses = sieve.method.losses(traces)
    stage = traces[0].reports[RELEVANCE_REPORT][0]
    assert stage.target.shape == (2, CELLS) and torch.equal(stage.target.view(2, GRID, GRID)[:, : GRID // 2],
                                                            torch.ones(2, GRID // 2, GRID))
    expected = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(s.logits, s.target)
                            for s in traces[0].reports[RELEVANCE_REPORT]]).mean()
    torch.testing.assert_close(losses["relevance"], expected)


def test_no_relevance_loss_without_a_target_mask():
    model = sam_model().train()
    sieve = ts.patch(model, _vltp(), dense=True)
    with ts.inputs(model, guidance=_guidance(2)), ts.trace(model) as traces:
        model(pixel_values=images(2))
    assert sieve.method.losses(traces) == {}


def _thresholded(model, keep=(0.5, 0.25)) -> ts.Sieve:
    return ts.patch(model, _vltp(keep=keep, by_threshold=True), dense=True)


def _batches(count: int, batch: int = 2) -> list[dict[str, Tensor]]:
    """Validation batches for calibration: images with their guidance, given as a per-call input."""
    return [{"pixel_values": images(batch, seed=10 + i), "guidance": _guidance(batch, seed=10 + i)}
            for i in range(count)]


def test_by_threshold_calibrates_to_the_keep_shares_and_keeps_each_images_cells_above_them():
    model = sam_model()
    sieve = _thresholded(model)
    result = ts.calibrate(model, _batches(4))
    thresholds = sieve.parts[0]["thresholds"].values
    assert result.layers == (1, 2) and result.targets == (0.5, 0.25)
    assert thresholds.tolist() == pytest.approx(list(result.thresholds))
    assert result.shares == pytest.approx(result.targets, abs=1 / CELLS)  # over all of the data
    x, guidance = images(3, seed=1), _guidance(3, seed=1)
    pruned, trace = _run(model, x, guidance)
    active = _active_cells(trace)
    torch.testing.assert_close(pruned, reference_encoder(model, x, active), atol=TOLERANCE, rtol=0)
    stages = {stage.layer: stage.logits for stage in trace.reports[RELEVANCE_REPORT]}
    for index, layer in enumerate((1, 2)):
        above = stages[layer] > torch.logit(thresholds[index])
        for b in range(3):  # each image keeps its own cells rated above the stage's threshold
            expected = above[b].nonzero()[:, 0] if above[b].any() else stages[layer][b].argmax()[None]
            assert torch.equal(active[layer][b], expected)
    counts = {len(cells) for cells in active[1]}
    assert len(counts) > 1  # per-image counts: a ragged batch
    for b in range(3):
        alone, _ = _run(model, x[b : b + 1], guidance[b : b + 1])
        torch.testing.assert_close(alone, pruned[b : b + 1], atol=TOLERANCE, rtol=0)


def test_by_threshold_meets_a_macs_budget_with_the_decoder_counted():
    model = sam_model()
    _thresholded(model)
    data = _batches(4)
    result = ts.calibrate(model, data, macs_budget=0.8)
    assert result.macs == pytest.approx(0.8 * result.dense_macs, rel=0.01)
    spent = []
    for batch in data:
        with ts.inputs(model, guidance=batch["guidance"]):
            spent.append(ts.flops(model, batch["pixel_values"]).macs)
    assert sum(spent) / len(spent) == pytest.approx(result.macs, rel=1e-6)


def test_a_threshold_of_zero_keeps_every_cell_and_one_of_one_keeps_the_best_cell_per_image():
    model = sam_model()
    x, guidance = images(2), _guidance(2)
    with torch.no_grad():
        dense = model(pixel_values=x).last_hidden_state
    sieve = _thresholded(model)
    sieve.parts[0]["thresholds"].values.fill_(0.0)
    kept_all, _ = _run(model, x, guidance)
    torch.testing.assert_close(kept_all, dense, atol=TOLERANCE, rtol=0)
    sieve.parts[0]["thresholds"].values.fill_(1.0)
    _, trace = _run(model, x, guidance)
    assert [len(cells) for cells in _active_cells(trace)[2]] == [1, 1]


def test_thresholds_are_stored_only_when_kept_by_threshold_and_the_decoder_is_shared_with_top_k():
    top_k = ts.patch(sam_model(), _vltp(), dense=True)
    assert "thresholds" not in top_k.parts[0]
    thresholded = _thresholded(sam_model())
    assert thresholded.method.ragged and thresholded.method.reads_thresholds
    missing = thresholded.parts[0].load_state_dict(top_k.parts[0].state_dict(), strict=False).missing_keys
    assert missing == ["thresholds.values"]  # a decoder trained top-k serves by threshold


def test_calibration_refuses_vltp_without_thresholds_naming_the_switch():
    model = sam_model()
    ts.patch(model, _vltp(), dense=True)
    with pytest.raises(ValueError, match="by_threshold=True"):
        ts.calibrate(model, _batches(1))

"""SViT: gates over the whole token grid, reactivation, mask-mode training with its keep-rate loss,
deterministic ragged inference, threshold calibration, FLOPs, and the SAM encoder."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re

import pytest
import torch
from click.testing import CliRunner
from flop_counting import counted_macs
from models import distinct_images, forward, host_model, images, max_difference, sam_model, strengthen
from test_train_support import patched_model, quiet_config, random_dataset
from torch import nn

import tokensieve as ts
from tokensieve.cli import main
from tokensieve.methods.dynamicvit import KeepPredictor
from tokensieve.methods.svit import dither_offsets
from tokensieve.train import cross_entropy, fit, keep_ratio_stages

PATCHES = 64
GATED = (1, 2, 3)  # SViT's default gates on the 4-block hosts: from depth // 4 on
GATE_MACS = PATCHES * (64 * 16 + 16 * 2)  # one MLP gate scoring every patch token of a 64-wide host
TOLERANCE = 1e-5


def _gates(model: nn.Module) -> list[nn.Module]:
    """The SViT gates of the patched `model`, in block order."""
    return list(ts.sieve_of(model).parts[0].values())


def _set_thresholds(model: nn.Module, value: float) -> None:
    for gate in _gates(model):
        gate.threshold.fill_(value)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)


def _active(record, sample: int) -> set[int]:
    """The input positions active in one block of a trace, for one sample."""
    index = record.index[sample]
    if record.valid is not None:
        index = index[record.valid[sample]]
    return set(index.tolist())


# --- the config and its parts ------------------------------------------------------------------------


def test_the_schedule_aims_at_keep_keep2_keep3_over_three_equal_groups_of_the_late_blocks():
    schedule = ts.SViT().schedule(12)
    assert list(schedule) == list(range(3, 12))  # blocks 4-12 of 12
    assert list(schedule.values()) == pytest.approx([0.7] * 3 + [0.49] * 3 + [0.343] * 3)
    assert ts.SViT(keep=0.5, layers=(1, 2)).schedule(4) == {1: 0.5, 2: 0.25}
    with pytest.raises(ValueError, match="past this model's 4 blocks"):
        ts.patch(host_model("timm-vit"), ts.SViT(layers=(2, 4)))


def test_each_gate_is_an_mlp_with_its_threshold_in_the_handles_state_dict():
    sieve = ts.patch(host_model("timm-vit"), ts.SViT())
    state = sieve.state_dict()
    names = ("norm.weight", "norm.bias", "hidden.weight", "hidden.bias", "out.weight", "out.bias",
             "threshold")
    assert sorted(state) == sorted(f"parts.0.{layer}.{name}" for layer in GATED for name in names)
    gate = sieve.parts[0]["1"]
    assert [type(m) for m in gate.children()] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear]
    assert state["parts.0.1.hidden.weight"].shape == (16, 64)
    assert state["parts.0.1.out.weight"].shape == (2, 16)
    assert state["parts.0.1.threshold"].item() == 0.5
    assert gate.macs(PATCHES) == GATE_MACS

    for gate, threshold in zip(sieve.parts[0].values(), (0.2, 0.4, 0.6), strict=True):
        gate.threshold.fill_(threshold)
    fresh = ts.patch(host_model("timm-vit"), ts.SViT())
    fresh.load_state_dict(sieve.state_dict())
    assert [gate.threshold.item() for gate in fresh.parts[0].values()] == pytest.approx([0.2, 0.4, 0.6])


def test_the_dynamicvit_gate_is_its_local_and_global_predictor_with_a_threshold():
    sieve = ts.patch(host_model("timm-vit"), ts.SViT(gate="dynamicvit"))
    gate = sieve.parts[0]["1"]
    assert isinstance(gate, KeepPredictor)
    assert "parts.0.1.threshold" in sieve.state_dict() and "parts.0.1.embed.1.weight" in sieve.state_dict()


# --- inference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_thresholds_at_zero_keep_every_token_and_give_the_hosts_output(dense):
    host = strengthen(host_model("timm-vit"))
    model = copy.deepcopy(host)
    ts.patch(model, ts.SViT(keep=0.5), dense=dense)
    _set_thresholds(model, 0.0)
    x = images(2)
    with ts.trace(model) as traces:
        out = forward(model, x)
    assert traces[0].kept_tokens().tolist() == [[1 + PATCHES] * 2] * 4
    assert max_difference(out, forward(host, x)) <= TOLERANCE


def test_inference_is_deterministic_with_per_image_counts():
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5))
    x = distinct_images()
    with ts.trace(model) as first:
        once = forward(model, x)
    with ts.trace(model) as second:
        again = forward(model, x)
    assert torch.equal(once["out"], again["out"])
    counts = first[0].kept_tokens()
    assert torch.equal(counts, second[0].kept_tokens())
    assert counts[1].unique().numel() > 1  # the images keep their own counts: a ragged batch
    assert ts.SViT().ragged and not ts.SViT(per_image=True).ragged


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("gate", ["mlp", "dynamicvit"])
def test_each_image_of_a_batch_gives_what_it_gives_alone_with_three_heads(gate, attention):
    model = strengthen(host_model("timm-vit", embed_dim=48, num_heads=3))
    ts.patch(model, ts.SViT(keep=0.5, gate=gate), attention=attention)
    x = distinct_images()
    ts.calibrate(model, x)  # an untrained predictor rates every token alike: thresholds that split them
    with ts.trace(model) as traces:
        batch = forward(model, x)["out"]
    assert traces[0].kept_tokens()[-1].unique().numel() > 1
    for i in range(len(x)):
        with ts.trace(model) as alone_traces:
            alone = forward(model, x[i : i + 1])["out"]
        assert alone_traces[0].kept_tokens()[:, 0].tolist() == traces[0].kept_tokens()[:, i].tolist()
        torch.testing.assert_close(batch[i], alone[0], atol=TOLERANCE, rtol=0)


def test_a_token_passed_over_at_one_gate_can_come_back_at_the_next():
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5))
    with ts.trace(model) as traces:
        forward(model, distinct_images())
    layers = traces[0].layers
    back = [_active(layers[2], i) - _active(layers[1], i) for i in range(3)]
    assert any(back)  # active before block 2, though frozen before block 1


def _svit_by_hand(model: nn.Module, gates: dict[int, nn.Module], image: torch.Tensor, dither: bool = False
                  ) -> tuple[list[torch.Tensor], list[set[int]]]:
    """SViT's inference spelled out on the unpatched timm model for one image: the grid holds every
    position's last features; before each gated block the gate scores every patch position from the
    grid (with `dither`, plus the gate's fixed offset at each position), the block runs on the
    prefix and the positions rated above the threshold (the best one if none is), and its output is
    written back. Returns the grid after each block and the positions each block ran on."""
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        grid = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))  # [1, N0, C]
        active = torch.arange(grid.shape[1])
        grids, actives = [], []
        for layer, block in enumerate(model.blocks):
            gate = gates.get(layer)
            if gate is not None:
                logits = gate(grid[:, prefix:])[0]
                scores = logits[:, 1] - logits[:, 0]
                if dither:
                    rank = sorted(gates).index(layer)
                    scores = scores + dither_offsets(rank, grid.shape[1] + 1)[prefix:-1]
                votes = scores.double() > torch.logit(gate.threshold.double())
                kept = votes.nonzero()[:, 0] if votes.any() else scores.argmax()[None]
                active = torch.cat([torch.arange(prefix), kept + prefix])
            grid = grid.clone()
            grid[:, active] = block(grid[:, active])
            grids.append(grid)
            actives.append(set(active.tolist()))
    return grids, actives


@pytest.mark.parametrize("dither", [False, True], ids=["thresholds", "dithered"])
@pytest.mark.parametrize("images_of", [distinct_images, lambda: distinct_images()[1:2]],
                         ids=["ragged-batch", "one-image"])
def test_dense_inference_equals_svit_spelled_out_one_image_at_a_time(images_of, dither):
    """The executor's shortcuts (the grid written back once per block, the selection read off the
    votes, a ragged batch run on its real tokens only) leave each block's dense output what the
    plain computation gives, to float rounding."""
    host = strengthen(host_model("timm-vit"))
    model = copy.deepcopy(host)
    ts.patch(model, ts.SViT(keep=0.5, dither=dither), dense=True)
    x = images_of()
    ts.calibrate(model, distinct_images())
    outputs: list[torch.Tensor] = []  # kept as given: a later write into the grid must not reach them
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out))
             for block in model.blocks]
    with torch.no_grad(), ts.trace(model) as traces:
        features = model.forward_features(x)
    for hook in hooks:
        hook.remove()
    gates = {int(layer): gate for layer, gate in ts.sieve_of(model).parts[0].items()}
    if len(x) > 1:
        assert any(counts.unique().numel() > 1 for counts in traces[0].kept_tokens())  # a ragged batch
    for i in range(len(x)):
        grids, actives = _svit_by_hand(host, gates, x[i], dither)
        assert [_active(record, i) for record in traces[0].layers] == actives
        for out, grid in zip(outputs, grids, strict=True):
            torch.testing.assert_close(out[i], grid[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(features[i], host.norm(grids[-1][0]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("setting", [{"reactivate": False}, {"preserve": False}])
def test_without_reactivation_a_frozen_token_stays_frozen(setting):
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5, **setting))
    with ts.trace(model) as traces:
        forward(model, distinct_images())
    layers = traces[0].layers
    for i in range(3):
        assert _active(layers[3], i) <= _active(layers[2], i) <= _active(layers[1], i)
    assert any(_active(layers[2], i) < _active(layers[1], i) for i in range(3))


def test_sampled_inference_draws_gumbel_decisions_as_its_authors_do_and_thresholds_do_not():
    model = strengthen(host_model("timm-vit"))
    x = distinct_images()
    gates = ts.patch(model, ts.SViT(keep=0.5)).state_dict()
    deterministic = [_features(model, x) for _ in range(2)]
    torch.testing.assert_close(deterministic[0], deterministic[1], atol=0, rtol=0)
    ts.patch(model, ts.SViT(keep=0.5, sampled=True)).load_state_dict(gates)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with ts.trace(model) as traces:
            outputs.append(_features(model, x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)  # the same draw
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3  # another draw
    decisions = traces[0].keep_decisions
    assert [d.layer for d in decisions] == list(GATED)
    assert all(((d.decisions == 0) | (d.decisions == 1)).all() for d in decisions)
    assert all(record.valid is None for record in traces[0].layers)  # mask mode: every token computed


def test_dithering_spreads_a_tokens_gates_by_its_keep_probability_more_evenly_than_sampling():
    """Over many gates, a position's offsets clear logit(1 - p) at a share p of them, for every
    position: each token is kept at about the share of gates Gumbel sampling keeps it at, without
    sampling's spread (iid draws stray by up to 0.2 over 40 gates, for some of 197 positions)."""
    gates, tokens = 40, 197
    offsets = torch.stack([dither_offsets(rank, tokens) for rank in range(gates)])  # [gates, tokens]
    torch.testing.assert_close(dither_offsets(3, tokens), offsets[3], atol=0, rtol=0)  # fixed, not drawn
    for p in (0.1, 0.3, 0.5, 0.8):
        kept = (offsets + torch.logit(torch.tensor(p)) > 0).float().mean(dim=0)  # each position's share
        assert (kept - p).abs().max() <= 2 / gates + 1e-6  # within two gates' share
    assert offsets[0].std() > 1.0  # the offsets differ across positions at each gate


def test_dithered_inference_is_deterministic_and_keeps_other_tokens_than_plain_thresholds():
    model = strengthen(host_model("timm-vit"))
    gates = ts.patch(model, ts.SViT(keep=0.5)).state_dict()
    x = distinct_images()
    with ts.trace(model) as plain:
        forward(model, x)
    ts.patch(model, ts.SViT(keep=0.5, dither=True)).load_state_dict(gates)
    with ts.trace(model) as first:
        once = forward(model, x)["out"]
    with ts.trace(model) as second:
        again = forward(model, x)["out"]
    torch.testing.assert_close(once, again, atol=0, rtol=0)
    assert [_active(r, 0) for r in first[0].layers] == [_active(r, 0) for r in second[0].layers]
    assert any(_active(d, i) != _active(p, i) for d, p in zip(first[0].layers, plain[0].layers, strict=True)
               for i in range(len(x)))


def test_every_gate_keeps_at_least_one_token_per_image_at_threshold_one():
    model = strengthen(host_model("timm-vit", reg_tokens=4))
    ts.patch(model, ts.SViT(keep=0.5))
    _set_thresholds(model, 1.0)
    with ts.trace(model) as traces:
        out = forward(model, images(3))["out"]
    assert torch.isfinite(out).all()
    prefix = 1 + 4
    assert traces[0].kept_tokens().tolist() == [[prefix + PATCHES] * 3] + [[prefix + 1] * 3] * 3


def test_the_fixed_rate_variant_keeps_each_gates_share_of_every_image():
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5, per_image=True))
    with ts.trace(model) as traces:
        forward(model, distinct_images())
    kept = traces[0].kept_tokens()[:, 0].tolist()
    assert kept == [1 + PATCHES, 1 + 32, 1 + 16, 1 + 8]
    assert all(record.valid is None for record in traces[0].layers)  # equal counts, no padding


def test_without_preserve_dropped_tokens_leave_the_dense_map_and_the_kept_ones_equal_no_reactivation():
    model = strengthen(host_model("timm-vit"))
    x = distinct_images()
    ts.patch(model, ts.SViT(keep=0.5, reactivate=False), dense=True)
    gates = ts.sieve_of(model).state_dict()
    with ts.trace(model) as traces:
        frozen = _features(model, x)
    ts.patch(model, ts.SViT(keep=0.5, preserve=False), dense=True).load_state_dict(gates)
    dropped = _features(model, x)
    assert dropped.shape == frozen.shape == (3, 1 + PATCHES, 64)
    empty = model.norm(torch.zeros(64))  # the final norm of a zero row: the cell of a discarded token
    for i in range(3):
        kept = sorted(_active(traces[0].layers[-1], i))
        gone = sorted(set(range(1 + PATCHES)) - set(kept))
        assert gone
        torch.testing.assert_close(dropped[i, kept], frozen[i, kept], atol=0, rtol=0)
        torch.testing.assert_close(dropped[i, gone], empty.expand(len(gone), -1))
        assert (frozen[i, gone] - empty).abs().max() > 1e-3


def test_mask_mode_without_preserve_zeroes_the_dropped_tokens_through_their_decisions():
    model = strengthen(host_model("timm-vit")).train()
    ts.patch(model, ts.SViT(keep=0.5, preserve=False), dense=True)
    torch.manual_seed(0)
    with ts.trace(model) as traces:
        out = model.forward_features(images(2))
    last = traces[0].keep_decisions[-1].decisions  # cumulative without reactivation: kept by every gate
    empty = model.norm(torch.zeros(64))
    gone = last.detach() == 0
    assert gone.any() and (~gone).any()
    torch.testing.assert_close(out[:, 1:][gone], empty.expand(int(gone.sum()), -1))
    (out[:, 1:][gone] * torch.randn(int(gone.sum()), 64)).sum().backward()
    # the straight-through gradient of the zeroing reaches the gates
    assert all(gate.out.weight.grad.abs().sum() > 0 for gate in _gates(model))


# --- FLOPs ----------------------------------------------------------------------------------------------


def test_the_gates_are_their_own_overhead_line_counted_on_every_token_they_score():
    model = host_model("timm-vit")
    ts.patch(model, ts.SViT(keep=0.5))
    x = images(2)
    report = ts.flops(model, x)
    assert report.overhead == {"gate": pytest.approx(len(GATED) * GATE_MACS)}  # the whole grid, each gate
    assert report.macs == pytest.approx(report.backbone_macs + report.overhead_macs)
    assert report.macs < report.dense_macs

    ts.patch(model, ts.SViT(keep=0.5, reactivate=False))
    narrowed = ts.flops(model, x)
    assert narrowed.overhead["gate"] < report.overhead["gate"]  # only the tokens still active


def test_one_images_flops_agree_with_flop_counter_mode():
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5))
    x = distinct_images()[1:2]
    assert ts.flops(model, x).macs == pytest.approx(counted_macs(model, x, batch=1), rel=0.01)


def test_cli_flops_reads_an_svit_spec():
    result = CliRunner().invoke(main, ["flops", "deit_tiny_patch16_224", "svit:keep=0.7,gate=mlp", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["method"] == "SViT(keep=0.7)"
    assert 0 < row["macs"] < row["dense_macs"]


# --- SAM's windowed encoder -------------------------------------------------------------------------------


def test_the_sam_encoder_runs_with_real_savings_and_each_image_as_alone():
    host = sam_model()
    model = copy.deepcopy(host)
    ts.patch(model, ts.SViT(keep=0.5))
    x = distinct_images()
    report = ts.flops(model, x)
    assert report.overhead["gate"] > 0
    assert report.macs < 0.8 * report.dense_macs  # gates included
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
        expected = host(pixel_values=x).last_hidden_state
        assert out.shape == expected.shape and (out - expected).abs().max() > 1e-3
        for i in range(len(x)):
            alone = model(pixel_values=x[i : i + 1]).last_hidden_state
            torch.testing.assert_close(out[i], alone[0], atol=TOLERANCE, rtol=0)


def test_the_sam_encoder_trains_its_gates_in_mask_mode():
    model = sam_model().train()
    sieve = ts.patch(model, ts.SViT(keep=0.5))
    with ts.trace(model) as traces:
        out = model(pixel_values=images(2)).last_hidden_state
    loss = out.square().mean() + sum(sieve.method.losses(traces).values())
    loss.backward()
    assert all(gate.hidden.weight.grad.abs().sum() > 0 for gate in _gates(model))


# --- training (mask mode) -----------------------------------------------------------------------------------


def _block_io(model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each block's input and output, recorded by forward hooks as the model runs."""
    seen = {}
    for layer, block in enumerate(model.blocks):
        block.register_forward_hook(
            lambda module, args, out, layer=layer: seen.__setitem__(layer, (args[0].detach(), out.detach())))
    return seen


def test_mask_mode_decides_per_token_and_pruned_tokens_pass_their_block_unchanged():
    model = strengthen(host_model("timm-vit")).train()
    sieve = ts.patch(model, ts.SViT(keep=0.5))
    seen = _block_io(model)
    torch.manual_seed(0)
    with ts.trace(model) as traces:
        out = model(images(2))
    decisions = traces[0].keep_decisions
    assert [d.layer for d in decisions] == list(GATED)
    for d in decisions:
        assert d.decisions.shape == (2, PATCHES) and not d.ratio_loss
        pruned = d.decisions.detach() == 0
        kept = (d.decisions.detach() - 1).abs() < 1e-6  # 1 up to the straight-through rounding
        assert (pruned | kept).all() and pruned.any() and kept.any()
        block_in, block_out = (tensor[:, 1:] for tensor in seen[d.layer])
        assert torch.equal(block_out[pruned], block_in[pruned])
        assert (block_out[~pruned] - block_in[~pruned]).abs().amax(dim=-1).min() > 0
    # reactivation: a token passed over at a gate runs the next gated block
    assert ((decisions[0].decisions == 0) & (decisions[1].decisions > 0.5)).any()

    loss = out.square().mean() + sieve.method.losses(traces)["keep_rate"]
    loss.backward()
    for gate in _gates(model):
        assert gate.hidden.weight.grad.abs().sum() > 0 and gate.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reactivate", [True, False])
def test_training_under_thresholds_keeps_what_inference_keeps_with_straight_through_gradients(reactivate):
    model = strengthen(host_model("timm-vit"))
    sieve = ts.patch(model, ts.SViT(keep=0.5, reactivate=reactivate, train_decisions="thresholds"))
    x = distinct_images()
    with ts.trace(model) as inferred:
        _features(model, x)
    model.train()
    runs = []
    for seed in (0, 1):  # no draw: the random state does not matter
        torch.manual_seed(seed)
        with ts.trace(model) as traces:
            out = model(x)
        runs.append(traces[0])
    first, second = (run.keep_decisions for run in runs)
    assert all(torch.equal(a.decisions, b.decisions) for a, b in zip(first, second, strict=True))
    gated = [record for record in inferred[0].layers if record.layer in GATED]
    for decision, record in zip(first, gated, strict=True):
        for sample in range(x.shape[0]):
            kept = {1 + int(i) for i in (decision.decisions[sample].detach() > 0.5).nonzero()}
            assert kept == _active(record, sample) - {0}  # the class token always runs
    assert any(bool((d.decisions.detach() < 0.5).any()) for d in first)
    (out.square().mean() + sieve.method.losses([runs[1]])["keep_rate"]).backward()
    for gate in _gates(model):
        assert gate.hidden.weight.grad.abs().sum() > 0


def test_training_under_thresholds_keeps_the_best_rated_token_when_none_clears_the_threshold():
    model = strengthen(host_model("timm-vit")).train()
    ts.patch(model, ts.SViT(keep=0.5, train_decisions="thresholds"))
    _set_thresholds(model, 1.0)
    with ts.trace(model) as traces:
        model(images(2))
    for decision in traces[0].keep_decisions:
        assert (decision.decisions.detach() > 0.5).sum(dim=1).tolist() == [1, 1]


@pytest.mark.parametrize("setting", [{"reactivate": False}, {"preserve": False}])
def test_mask_mode_without_reactivation_never_brings_a_token_back(setting):
    model = strengthen(host_model("timm-vit")).train()
    ts.patch(model, ts.SViT(keep=0.7, **setting))
    torch.manual_seed(0)
    with ts.trace(model) as traces:
        model(images(2))
    decisions = [d.decisions for d in traces[0].keep_decisions]
    for earlier, later in itertools.pairwise(decisions):
        assert (later <= earlier + 1e-6).all()
    assert (decisions[-1] < decisions[0]).any()


@pytest.mark.parametrize("reactivate", [True, False])
def test_the_dynamicvit_gate_trains_in_mask_mode(reactivate):
    model = strengthen(host_model("timm-vit")).train()
    sieve = ts.patch(model, ts.SViT(keep=0.5, gate="dynamicvit", reactivate=reactivate))
    torch.manual_seed(0)
    with ts.trace(model) as traces:
        out = model(images(2))
    assert [d.layer for d in traces[0].keep_decisions] == list(GATED)
    (out.square().mean() + sieve.method.losses(traces)["keep_rate"]).backward()
    for gate in _gates(model):
        assert gate.head[-1].weight.grad.abs().sum() > 0 and gate.embed[1].weight.grad.abs().sum() > 0


def test_keep_one_prunes_nothing_in_training_either():
    host = strengthen(host_model("timm-vit")).train()
    model = copy.deepcopy(host)
    ts.patch(model, ts.SViT(keep=1.0))
    x = images(2)
    with ts.trace(model) as traces:
        out = model(x)
    assert traces[0].keep_decisions == []
    torch.testing.assert_close(out, host(x), atol=TOLERANCE, rtol=0)


def test_the_keep_rate_loss_holds_the_batch_mean_or_each_image_to_each_gates_target():
    method = ts.SViT(keep=0.6)
    model = strengthen(host_model("timm-vit")).train()
    ts.patch(model, method)
    torch.manual_seed(0)
    with ts.trace(model) as traces:
        model(images(3))
    decisions = [d.decisions for d in traces[0].keep_decisions]
    targets = [0.6, 0.36, 0.216]
    batch_mean = torch.stack([(d.mean() - t) ** 2 for d, t in zip(decisions, targets, strict=True)]).mean()
    per_image = torch.stack([((d.mean(dim=1) - t) ** 2).mean()
                             for d, t in zip(decisions, targets, strict=True)]).mean()
    torch.testing.assert_close(method.losses(traces)["keep_rate"], 4.0 * batch_mean)
    fixed = dataclasses.replace(method, per_image=True, rate_weight=2.0)
    torch.testing.assert_close(fixed.losses(traces)["keep_rate"], 2.0 * per_image)
    assert not torch.isclose(batch_mean, per_image)
    assert keep_ratio_stages(traces) == []  # fit's own keep-ratio loss leaves SViT's decisions alone


def test_fit_adds_the_keep_rate_loss_once_and_logs_each_gates_share():
    model = patched_model(ts.SViT(keep=0.6))
    config = quiet_config(steps=2, batch_size=4, distill_weight=0.0)
    result = fit(model, random_dataset(8), cross_entropy, config)
    for record in result.history:
        assert record.loss_keep_ratio is None
        assert set(record.method_losses) == {"keep_rate"} and record.method_losses["keep_rate"] > 0
        assert len(record.keep_per_stage) == len(GATED)
        assert 0 < record.kept_rate < 1
        assert record.loss == pytest.approx(record.loss_task + record.method_losses["keep_rate"], rel=1e-5)


# --- calibration ---------------------------------------------------------------------------------------


def _kept_shares(model: nn.Module, batches: list[torch.Tensor], layers=GATED) -> list[float]:
    """The share of the data's patch tokens active in each gated block, measured from traces."""
    kept, patches = torch.zeros(len(layers)), 0
    with ts.trace(model) as traces, torch.no_grad():
        for batch in batches:
            model(batch)
    for record in traces:
        patches += record.batch * PATCHES
        for i, layer in enumerate(layers):
            kept[i] += record.attention_tokens()[layer].sum() - record.batch * record.prefix
    return (kept / patches).tolist()


@pytest.mark.parametrize(("reactivate", "dither"), [(True, False), (False, False), (True, True)])
def test_calibration_makes_each_gate_keep_its_target_share_of_the_data_it_was_given(reactivate, dither):
    model = strengthen(host_model("timm-vit"))
    method = ts.SViT(keep=0.6, reactivate=reactivate, dither=dither)
    ts.patch(model, method)
    data = images(8, seed=3)
    result = ts.calibrate(model, [(batch, None) for batch in data.split(4)])
    assert result.layers == GATED and result.targets == pytest.approx(tuple(method.schedule(4).values()))
    assert [gate.threshold.item() for gate in _gates(model)] == pytest.approx(result.thresholds)
    assert result.thresholds != (0.5, 0.5, 0.5)
    shares = _kept_shares(model, list(data.split(4)))
    assert shares == pytest.approx(result.shares)
    for share, target in zip(shares, result.targets, strict=True):
        assert abs(share - target) <= 1 / (8 * PATCHES)  # within a token's share


def test_calibration_to_a_macs_budget_lands_within_two_percent_of_it():
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.7))
    data = images(8, seed=4)
    task_model = nn.Sequential(model)  # the patched module inside a larger model
    result = ts.calibrate(task_model, data, macs_budget=0.6, batch_size=4)
    report = ts.flops(model, data)
    assert report.macs / report.dense_macs == pytest.approx(0.6, rel=0.02)
    assert result.macs == pytest.approx(report.macs, rel=1e-3) and result.scale != 1.0


def test_calibration_refuses_what_it_cannot_calibrate_naming_the_fix():
    model = host_model("timm-vit")
    with pytest.raises(ValueError, match="no module of this model is patched with a method that keeps"):
        ts.calibrate(model, images(2))
    ts.patch(model, ts.SViT(per_image=True))
    with pytest.raises(ValueError, match="per_image=False"):
        ts.calibrate(model, images(2))
    ts.patch(model, ts.SViT())
    with pytest.raises(ValueError, match="re-iterable"):
        ts.calibrate(model, iter([images(2)]))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ts.calibrate(model, images(2), macs_budget=1.5)


@pytest.mark.parametrize("rounds", [1, 20])
def test_a_budget_just_under_the_fewest_macs_is_refused_however_few_the_rounds(rounds):
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.7))
    data = images(4, seed=5)
    with pytest.raises(ValueError, match="fewest MACs") as refused:
        ts.calibrate(model, data, macs_budget=0.05)
    fewest = float(re.search(r"are ([0-9.]+) of dense", str(refused.value)).group(1))
    with pytest.raises(ValueError, match="fewest MACs"):
        ts.calibrate(model, data, macs_budget=fewest - 0.02, max_rounds=rounds)
    result = ts.calibrate(model, data, macs_budget=fewest + 0.05, max_rounds=rounds + 5)
    assert result.macs / result.dense_macs == pytest.approx(fewest + 0.05, abs=0.02)


def test_a_failed_calibration_leaves_the_thresholds_as_they_were():
    model = host_model("timm-vit")
    ts.patch(model, ts.SViT(keep=0.7))
    with pytest.raises(ValueError, match="fewest MACs"):
        ts.calibrate(model, images(2), macs_budget=0.05)
    assert [gate.threshold.item() for gate in _gates(model)] == [0.5] * len(GATED)

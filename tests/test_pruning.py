"""A pruning setting really runs fewer tokens, by the documented counts, and changes the output."""

import math

import pytest
import torch
from models import PATCHES, forward, host_model, images, max_difference, strengthen

import tokensieve as ts

HOSTS = ["timm-vit", "timm-reg-gap", "ViTForImageClassification", "Dinov2WithRegistersForImageClassification"]
PREFIX = {"timm-vit": 1, "timm-reg-gap": 5, "ViTForImageClassification": 1,
          "Dinov2WithRegistersForImageClassification": 5}


def _topk_counts(prefix: int) -> tuple[list[int], list[int]]:
    """TopK(keep=0.5, layers=(1, 2)): keep ceil(n/2) of the n patch tokens after attention."""
    after_1 = math.ceil(PATCHES / 2)
    after_2 = math.ceil(after_1 / 2)
    kept = [PATCHES, after_1, after_2, after_2]
    attention = [PATCHES, PATCHES, after_1, after_2]
    return [prefix + k for k in kept], [prefix + k for k in attention]


def _evit_counts(prefix: int) -> tuple[list[int], list[int]]:
    """EViT(keep=0.5, layers=(1, 2)): keep ceil(n/2) and fuse the rest into one extra token."""
    after_1 = math.ceil(PATCHES / 2) + 1
    after_2 = math.ceil(after_1 / 2) + 1
    kept = [PATCHES, after_1, after_2, after_2]
    attention = [PATCHES, PATCHES, after_1, after_2]
    return [prefix + k for k in kept], [prefix + k for k in attention]


def _dynamicvit_counts(prefix: int) -> tuple[list[int], list[int]]:
    """DynamicViT(keep=0.5, layers=(1, 2)): before block layers[s], keep 0.5**(s+1) of the input."""
    stage_1, stage_2 = int(PATCHES * 0.5), int(PATCHES * 0.25)
    kept = [PATCHES, stage_1, stage_2, stage_2]
    return [prefix + k for k in kept], [prefix + k for k in kept]


def _tome_counts(prefix: int) -> tuple[list[int], list[int]]:
    """ToMe(r=8): every block merges 8 tokens between attention and MLP."""
    kept = [PATCHES - 8 * (i + 1) for i in range(4)]
    attention = [PATCHES - 8 * i for i in range(4)]
    return [prefix + k for k in kept], [prefix + k for k in attention]


METHODS = {
    "topk": (ts.TopK(keep=0.5, layers=(1, 2)), _topk_counts),
    "evit": (ts.EViT(keep=0.5, layers=(1, 2)), _evit_counts),
    "dynamicvit": (ts.DynamicViT(keep=0.5, layers=(1, 2)), _dynamicvit_counts),
    "tome": (ts.ToMe(r=8), _tome_counts),
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("host", HOSTS)
def test_pruning_runs_the_documented_token_counts_and_changes_the_output(host, name):
    method, counts = METHODS[name]
    model = strengthen(host_model(host))
    x = images(2)
    dense = forward(model, x)
    ts.patch(model, method)
    with ts.trace(model) as traces:
        pruned = forward(model, x)
    assert len(traces) == 1
    trace = traces[0]
    kept, attention = counts(PREFIX[host])
    assert trace.kept_tokens().tolist() == [[k, k] for k in kept]
    assert trace.attention_tokens().tolist() == [[a, a] for a in attention]
    assert trace.input_tokens == PREFIX[host] + PATCHES
    assert max_difference(pruned, dense) > 1e-4  # far above the 1e-7 rounding of an equal run


@pytest.mark.parametrize("name", ["topk", "evit", "dynamicvit", "tome"])
def test_trace_index_names_distinct_input_positions_with_the_prefix_first(name):
    method, _ = METHODS[name]
    model = host_model("timm-reg-gap")
    ts.patch(model, method)
    with ts.trace(model) as traces:
        forward(model, images(2))
    prefix, fused = 5, -1
    for record, kept in zip(traces[0].layers, traces[0].kept_tokens(), strict=True):
        index = record.index  # [B, N']
        assert index.shape == (2, int(kept[0]))
        assert (index[:, :prefix] == torch.arange(prefix)).all()
        for row in index:
            real = row[row != fused]
            assert real.unique().numel() == real.numel()
            assert ((real >= 0) & (real < prefix + PATCHES)).all()
        assert record.valid is None


def test_evit_trace_counts_class_attention_overhead_at_its_pruning_layers_only():
    model = host_model("timm-vit")
    ts.patch(model, ts.EViT(keep=0.5, layers=(2,)))
    with ts.trace(model) as traces:
        forward(model, images(2))
    overheads = [record.overhead for record in traces[0].layers]
    assert [bool(o) for o in overheads] == [False, False, True, False]
    assert all(int(torch.as_tensor(v).min()) > 0 for v in overheads[2].values())


def test_trace_collects_one_trace_per_forward():
    model = host_model("timm-vit")
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    with ts.trace(model) as traces:
        forward(model, images(1))
        forward(model, images(3))
    assert [t.batch for t in traces] == [1, 3]
    forward(model, images(2))  # outside the scope: not collected
    assert len(traces) == 2


@pytest.mark.parametrize("method", [
    ts.EViT(keep=0.5, layers=(1, 2)), ts.ToMe(r=8), ts.TopK(mass=0.6, layers=(1, 2)),
    ts.DynamicViT(keep=0.7, layers=(1, 2), dynamic=True),
], ids=["evit", "tome", "topk-mass", "dynamicvit-dynamic"])
def test_eager_attention_gives_the_sdpa_result_when_pruning(method):
    # Registers and a class-token head (ragged methods are refused on mean-pooling heads).
    model = strengthen(host_model("timm-vit", reg_tokens=4))
    x = images(3)
    ts.patch(model, method, attention="sdpa")
    predictors = ts.sieve_of(model).state_dict()
    expected = forward(model, x)
    ts.patch(model, method, attention="eager").load_state_dict(predictors)
    assert max_difference(forward(model, x), expected) <= 1e-5


@pytest.mark.parametrize(("method", "layers"), [
    (ts.TopK, (2, 1)), (ts.TopK, (1, 1, 2)), (ts.EViT, (2, 1)), (ts.EViT, (1, 1, 2)),
    (ts.DynamicViT, (2, 1)), (ts.DynamicViT, (1, 1, 2)),
], ids=["topk-unsorted", "topk-repeated", "evit-unsorted", "evit-repeated", "dynamicvit-unsorted",
        "dynamicvit-repeated"])
def test_pruning_layers_are_a_set(method, layers):
    model = host_model("timm-vit")
    ts.patch(model, method(keep=0.5, layers=(1, 2)))
    with ts.trace(model) as expected:
        forward(model, images(1))
    ts.patch(model, method(keep=0.5, layers=layers))
    with ts.trace(model) as traces:
        forward(model, images(1))
    assert traces[0].kept_tokens().tolist() == expected[0].kept_tokens().tolist()


@pytest.mark.parametrize("r", [(4, 0), (4, -1), (4, 1)])
def test_tome_two_tuple_is_r_and_inflect_whatever_the_inflect_type(r):
    model = host_model("timm-vit")
    as_float = (r[0], float(r[1]))
    ts.patch(model, ts.ToMe(r=as_float))
    with ts.trace(model) as expected:
        forward(model, images(1))
    ts.patch(model, ts.ToMe(r=r))
    with ts.trace(model) as traces:
        forward(model, images(1))
    assert traces[0].kept_tokens().tolist() == expected[0].kept_tokens().tolist()

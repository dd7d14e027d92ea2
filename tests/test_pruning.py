"""A pruning setting really runs fewer tokens, by the documented counts, and changes the output."""

import dataclasses
import math

import pytest
import torch
from models import DEPTH, PATCHES, forward, host_model, images, max_difference, strengthen
from registry import methods

import tokensieve as ts

HOSTS = ["timm-vit", "timm-reg-gap", "ViTForImageClassification", "Dinov2WithRegistersForImageClassification"]
PREFIX = {"timm-vit": 1, "timm-reg-gap": 5, "ViTForImageClassification": 1,
          "Dinov2WithRegistersForImageClassification": 5}


def _class_attention_counts(method: ts.Method, prefix: int, fused: int = 0) -> tuple[list[int], list[int]]:
    """TopK, EViT: after attention in each of `layers`, keep ceil(keep * n) of the n non-prefix tokens
    (EViT fusing the rest into one extra token)."""
    tokens, kept, attention = PATCHES, [], []
    for layer in range(DEPTH):
        attention.append(tokens)
        if layer in method.layers:
            tokens = math.ceil(tokens * method.keep) + fused
        kept.append(tokens)
    return [prefix + k for k in kept], [prefix + a for a in attention]


def _evit_counts(method: ts.EViT, prefix: int) -> tuple[list[int], list[int]]:
    return _class_attention_counts(method, prefix, fused=1 if method.fuse else 0)


def _dynamicvit_counts(method: ts.DynamicViT, prefix: int) -> tuple[list[int], list[int]]:
    """DynamicViT: before block layers[s], keep keep**(s+1) of the input patches."""
    tokens, kept = PATCHES, []
    for layer in range(DEPTH):
        if layer in method.layers:
            tokens = int(PATCHES * method.keep ** (sorted(method.layers).index(layer) + 1))
        kept.append(tokens)
    return [prefix + k for k in kept], [prefix + k for k in kept]


def _tome_counts(method: ts.ToMe, prefix: int) -> tuple[list[int], list[int]]:
    """ToMe(r): every block merges r tokens between attention and MLP."""
    kept = [PATCHES - method.r * (i + 1) for i in range(DEPTH)]
    attention = [PATCHES - method.r * i for i in range(DEPTH)]
    return [prefix + k for k in kept], [prefix + a for a in attention]


def _random_drop_counts(method: ts.RandomDrop, prefix: int) -> tuple[list[int], list[int]]:
    """RandomDrop: before each of `layers`, keep ceil(keep * n) of the n non-prefix tokens."""
    tokens, kept = PATCHES, []
    for layer in range(DEPTH):
        if layer in method.layers:
            tokens = math.ceil(tokens * method.keep)
        kept.append(tokens)
    return [prefix + k for k in kept], [prefix + k for k in kept]


COUNTS = {  # the documented token counts of each method, for its settings
    ts.TopK: _class_attention_counts,
    ts.EViT: _evit_counts,
    ts.DynamicViT: _dynamicvit_counts,
    ts.ToMe: _tome_counts,
    ts.RandomDrop: _random_drop_counts,
}


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("host", HOSTS)
def test_pruning_runs_the_documented_token_counts_and_changes_the_output(host, method):
    model = strengthen(host_model(host))
    x = images(2)
    dense = forward(model, x)
    ts.patch(model, method)
    with ts.trace(model) as traces:
        pruned = forward(model, x)
    assert len(traces) == 1
    trace = traces[0]
    if type(method) in COUNTS:
        kept, attention = COUNTS[type(method)](method, PREFIX[host])
        assert trace.kept_tokens().tolist() == [[k, k] for k in kept]
        assert trace.attention_tokens().tolist() == [[a, a] for a in attention]
    else:  # a method without documented counts: fewer tokens at the end than at the start
        assert trace.kept_tokens()[-1].max() < trace.input_tokens
    assert trace.input_tokens == PREFIX[host] + PATCHES
    assert max_difference(pruned, dense) > 1e-4  # far above the 1e-7 rounding of an equal run


@pytest.mark.parametrize("method", methods())
def test_trace_index_names_distinct_input_positions_with_the_prefix_first(method):
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


@pytest.mark.parametrize("method", methods("pruned", "ragged"))
def test_eager_attention_gives_the_sdpa_result_when_pruning(method):
    # Registers and a class-token head (ragged methods are refused on mean-pooling heads).
    model = strengthen(host_model("timm-vit", reg_tokens=4))
    x = images(3)
    ts.patch(model, method, attention="sdpa")
    predictors = ts.sieve_of(model).state_dict()
    expected = forward(model, x)
    ts.patch(model, method, attention="eager").load_state_dict(predictors)
    assert max_difference(forward(model, x), expected) <= 1e-5


@pytest.mark.parametrize("layers", [(2, 1), (1, 1, 2)], ids=["unsorted", "repeated"])
@pytest.mark.parametrize("method", [param for param in methods()
                                    if "layers" in {f.name for f in dataclasses.fields(param.values[0])}])
def test_pruning_layers_are_a_set(method, layers):
    model = host_model("timm-vit")
    torch.manual_seed(0)  # the same learnable parts (MADTP's bank decides its counts) in both patches
    ts.patch(model, dataclasses.replace(method, layers=(1, 2)))
    with ts.trace(model) as expected:
        forward(model, images(1))
    torch.manual_seed(0)
    ts.patch(model, dataclasses.replace(method, layers=layers))
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

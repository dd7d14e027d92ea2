"""Properties of the token primitives, checked on many random shapes (hypothesis)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import host_model

import tokensieve as ts
from tokensieve import ops
from tokensieve.methods import AttentionView, MethodRun
from tokensieve.tokens import TokenState, write_tokens

seeds = st.integers(0, 2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _subset(data, tokens: int, k: int) -> list[int]:
    """k distinct positions of range(tokens), in ascending order."""
    return sorted(data.draw(st.permutations(range(tokens)))[:k])


@given(batch=st.integers(1, 3), prefix=st.integers(0, 3), tokens=st.integers(1, 12),
       channels=st.integers(1, 4), seed=seeds, data=st.data())
def test_select_then_write_back_restores_kept_rows_and_leaves_the_rest(batch, prefix, tokens, channels,
                                                                       seed, data):
    generator = _generator(seed)
    x = torch.randn(batch, prefix + tokens, channels, generator=generator)
    size = torch.randint(1, 5, (batch, prefix + tokens), generator=generator).float()
    k = data.draw(st.integers(1, tokens))
    kept = torch.tensor([_subset(data, tokens, k) for _ in range(batch)])  # [B, k]
    positions = torch.cat([torch.arange(prefix).expand(batch, prefix), kept + prefix], dim=1)
    state = TokenState.start(x, prefix).replace(size=size).select(positions)

    assert torch.equal(state.index, positions)
    assert torch.equal(state.x, torch.stack([x[b, positions[b]] for b in range(batch)]))
    assert torch.equal(state.size, size.gather(1, positions))
    assert state.prefix == prefix and state.valid is None

    grid = torch.randn(x.shape, generator=generator)
    restored = write_tokens(grid.clone(), state.index, state.x)
    chosen = torch.zeros(batch, prefix + tokens, dtype=torch.bool)
    chosen.scatter_(1, positions, True)
    assert torch.equal(restored[chosen], x[chosen])
    assert torch.equal(restored[~chosen], grid[~chosen])


@given(batch=st.integers(1, 3), prefix=st.integers(0, 2), tokens=st.integers(2, 12), seed=seeds,
       data=st.data())
def test_fuse_rest_appends_the_weighted_sum_of_the_dropped_tokens(batch, prefix, tokens, seed, data):
    generator = _generator(seed)
    x = torch.randn(batch, prefix + tokens, 3, generator=generator)
    weights = torch.rand(batch, tokens, generator=generator) + 0.1
    k = data.draw(st.integers(1, tokens - 1))
    kept = torch.tensor([_subset(data, tokens, k) for _ in range(batch)])
    positions = torch.cat([torch.arange(prefix).expand(batch, prefix), kept + prefix], dim=1)
    state = TokenState.start(x, prefix).fuse_rest(positions, weights)

    assert state.x.shape == (batch, prefix + k + 1, 3)
    assert (state.index[:, -1] == -1).all()
    for b in range(batch):
        dropped = sorted(set(range(tokens)) - set(kept[b].tolist()))
        w = weights[b, dropped]
        expected = (w[:, None] * x[b, [prefix + d for d in dropped]]).sum(0)  # as EViT: not over w.sum()
        torch.testing.assert_close(state.x[b, -1], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(state.x[b, : prefix + k], x[b, state.index[b, :-1]])


@given(batch=st.integers(1, 3), prefix=st.integers(0, 2), tokens=st.integers(2, 12), seed=seeds,
       data=st.data())
def test_fuse_rest_of_an_equal_count_selection_equals_the_ragged_path(batch, prefix, tokens, seed, data):
    generator = _generator(seed)
    x = torch.randn(batch, prefix + tokens, 3, generator=generator)
    size = torch.randint(1, 5, (batch, prefix + tokens), generator=generator).float()
    weights = torch.rand(batch, tokens, generator=generator) + 0.1
    k = data.draw(st.integers(1, tokens - 1))
    scores = torch.rand(batch, tokens, generator=generator)
    start = TokenState.start(x, prefix).replace(size=size)

    slots, valid = ops.keep_top(scores, k, prefix)
    equal = start.fuse_rest(slots, weights, valid)
    slots, valid = ops.keep_top(scores, torch.full((batch,), k), prefix)
    ragged = start.fuse_rest(slots, weights, valid)
    torch.testing.assert_close(equal.x, ragged.x, atol=1e-6, rtol=1e-6)
    assert torch.equal(equal.index, ragged.index)
    assert ragged.valid.all() and equal.valid is None
    assert torch.equal(equal.size, ragged.size)
    assert torch.equal(equal.size.sum(dim=1), size.sum(dim=1))  # every input token counted once


@given(batch=st.integers(1, 3), prefix=st.integers(0, 3), tokens=st.integers(1, 12), seed=seeds,
       data=st.data())
def test_keep_top_puts_the_prefix_first_then_the_top_k_and_leaves_the_scores(batch, prefix, tokens, seed,
                                                                            data):
    generator = _generator(seed)
    # distinct scores, so "the top k" is one set
    scores = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)]).float()
    before = scores.clone()
    k = data.draw(st.integers(1, tokens))
    expected = torch.cat([torch.arange(prefix).expand(batch, prefix),
                          ops.top_positions(scores, k) + prefix], dim=1)
    slots, valid = ops.keep_top(scores, k, prefix)
    assert torch.equal(slots, expected) and valid is None
    assert torch.equal(scores, before)


@given(batch=st.integers(1, 3), prefix=st.integers(0, 2), tokens=st.integers(2, 12), seed=seeds,
       data=st.data())
def test_activate_brings_frozen_tokens_back_with_the_features_they_had_when_frozen(batch, prefix, tokens,
                                                                                   seed, data):
    generator = _generator(seed)
    x = torch.randn(batch, prefix + tokens, 3, generator=generator)
    everyone = torch.arange(prefix + tokens).expand(batch, -1)
    k = data.draw(st.integers(1, tokens - 1))
    kept = torch.tensor([_subset(data, tokens, k) for _ in range(batch)])
    positions = torch.cat([torch.arange(prefix).expand(batch, prefix), kept + prefix], dim=1)
    state = TokenState.start(x, prefix, grid=True).activate(positions)  # the others are frozen now
    state = state.replace(x=state.x + 1.0)  # a block changes the active tokens
    state = state.activate(everyone)  # every frozen token comes back

    assert torch.equal(state.index, everyone)
    active = torch.zeros(batch, prefix + tokens, dtype=torch.bool).scatter_(1, positions, True)
    assert torch.equal(state.x[active], x[active] + 1.0)
    assert torch.equal(state.x[~active], x[~active])


@given(batch=st.integers(1, 4), tokens=st.integers(1, 12), masked=st.booleans(), seed=seeds, data=st.data())
def test_select_by_count_keeps_each_rows_top_scores_in_position_order_valid_first(batch, tokens, masked,
                                                                                  seed, data):
    generator = _generator(seed)
    # distinct scores, so "the top counts[b]" is one set
    scores = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(batch)]).float()
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    if masked:
        for b in range(batch):
            valid[b] = False
            valid[b, _subset(data, tokens, data.draw(st.integers(1, tokens)))] = True
    counts = torch.tensor([data.draw(st.integers(1, int(v.sum()))) for v in valid])

    positions, kept = ops.select_by_count(scores, counts, valid if masked else None)
    width = int(counts.max())
    assert positions.shape == kept.shape == (batch, width)
    for b in range(batch):
        count = int(counts[b])
        assert kept[b].tolist() == [True] * count + [False] * (width - count)
        chosen = positions[b, :count].tolist()
        assert chosen == sorted(chosen) and len(set(chosen)) == count
        candidates = [p for p in range(tokens) if valid[b, p]]
        best = sorted(candidates, key=lambda p: -scores[b, p].item())[:count]
        assert set(chosen) == set(best)
        assert ((positions[b] >= 0) & (positions[b] < tokens)).all()


@given(batch=st.integers(1, 4), tokens=st.integers(1, 12), masked=st.booleans(), seed=seeds)
def test_marked_positions_keep_what_keep_top_keeps_at_the_marks_counts(batch, tokens, masked, seed):
    generator = _generator(seed)
    scores = torch.randn(batch, tokens, generator=generator)
    threshold = torch.rand(batch, 1, generator=generator) * 2 - 1  # a share of each row above it
    valid = torch.rand(batch, tokens, generator=generator) < 0.7 if masked else None
    marks = scores > threshold if valid is None else (scores > threshold) & valid

    chosen = ops.marked_positions(marks)
    counts = marks.sum(dim=1)
    if int(counts.min()) < ops.MIN_KEPT_TOKENS:
        assert chosen is None
        return
    positions, kept = chosen
    expected, expected_kept = ops.keep_top(scores, counts, 0, valid)
    if kept is None:  # every row has the same count: no padding
        assert batch == 1 or bool((counts == counts[0]).all())
        kept = torch.ones_like(expected_kept)
    assert torch.equal(kept, expected_kept)
    assert torch.equal(positions[kept], expected[expected_kept])


@given(batch=st.integers(1, 3), prefix=st.integers(0, 3), patches=st.integers(2, 16), dim=st.integers(1, 4),
       seed=seeds, data=st.data())
def test_bipartite_merge_conserves_size_and_size_weighted_features(batch, prefix, patches, dim, seed, data):
    generator = _generator(seed)
    tokens = prefix + patches
    metric = torch.randn(batch, tokens, dim, generator=generator)
    x = torch.randn(batch, tokens, 3, generator=generator)
    size = torch.randint(1, 5, (batch, tokens), generator=generator).float()
    mergeable = len([p for p in range(0, tokens, 2) if p >= prefix])  # the unprotected A (even) tokens
    r = data.draw(st.integers(0, mergeable))

    plan = ops.bipartite_merge(metric, r, prefix)
    merge, survivors, destinations = plan.sum, plan.survivors, plan.destinations
    merged_size = merge(size)
    assert merged_size.shape == (batch, tokens - r)
    assert torch.equal(merged_size.sum(dim=1), size.sum(dim=1))
    merged_sum = merge(x * size[..., None])
    assert merged_sum.shape == (batch, tokens - r, 3)
    torch.testing.assert_close(merged_sum.sum(dim=1), (x * size[..., None]).sum(dim=1), atol=1e-5, rtol=1e-5)

    assert survivors.shape == (batch, tokens - r)
    assert torch.equal(survivors[:, :prefix], torch.arange(prefix).expand(batch, prefix))  # the prefix first
    # every input token lands in exactly one output slot, and slot j holds survivors[:, j]
    membership = merge(torch.eye(tokens).expand(batch, tokens, tokens))  # [B, N - r, N]
    assert torch.equal(membership.sum(dim=1), torch.ones(batch, tokens))
    assert torch.equal(membership.argmax(dim=1), destinations())  # the slot each input token went into
    for b in range(batch):
        row = survivors[b].tolist()
        assert len(set(row)) == len(row) and all(0 <= p < tokens for p in row)
        assert all(membership[b, j, p] == 1 for j, p in enumerate(row))
        assert (membership[b, :prefix, :prefix] == torch.eye(prefix)).all()  # protected: merged into nothing
        assert membership[b, :prefix].sum() == prefix  # ...and nothing merged into them
        gone = set(range(tokens)) - set(row)
        # only set-A tokens (even positions of the whole sequence) past the prefix merge away
        assert len(gone) == r and all(p % 2 == 0 and p >= prefix for p in gone)

    # The size-weighted mean, computed on the moved rows only, equals sum(s x) / sum(s) per slot.
    mean, mean_size = plan.average(x, size)
    assert torch.equal(mean_size, merged_size)
    torch.testing.assert_close(mean, merged_sum / merged_size[..., None], atol=1e-5, rtol=1e-5)
    ones_mean, ones_size = plan.average(x, None)
    torch.testing.assert_close(ones_mean, merge(x) / merge(torch.ones(batch, tokens))[..., None])
    assert torch.equal(ones_size, merge(torch.ones(batch, tokens)))


@given(tokens=st.integers(1, 300), keep=st.floats(1e-6, 1.0))
def test_keep_count_is_the_ceiling_of_the_share_and_at_least_one(tokens, keep):
    count = ops.keep_count(tokens, keep)
    assert max(ops.MIN_KEPT_TOKENS, min(tokens, math.ceil(keep * tokens - 1e-9))) == count
    assert 1 <= count <= tokens


_TOME_SPEC = ts.patch(host_model("timm-reg-gap"), ts.ToMe(r=0)).spec  # depth 4, prefix 5, 64 patches


@given(schedule=st.lists(st.integers(0, 12), min_size=1, max_size=_TOME_SPEC.depth), batch=st.integers(1, 3),
       seed=seeds)
def test_tome_sizes_always_sum_to_the_input_patch_count(schedule, batch, seed):
    spec, prefix = _TOME_SPEC, _TOME_SPEC.prefix
    patches = spec.input_tokens - prefix
    method = ts.ToMe(r=schedule)
    generator = _generator(seed)
    x = torch.randn(batch, prefix + patches, 8, generator=generator)
    state = TokenState.start(x, prefix).replace(trace=None)  # called outside a traced forward
    run = MethodRun(spec, None, None, False, {}, None)
    for layer in range(spec.depth):
        keys = torch.randn(batch, 2, state.tokens, 4, generator=generator)  # [B, H, N, d]
        state = method.after_attention(layer, state, AttentionView(keys, keys, None, 0.5, state), run)
        if state.size is None:
            assert state.tokens == prefix + patches
            continue
        assert (state.size[:, :prefix] == 1).all()
        assert (state.size[:, prefix:].sum(dim=1) == patches).all()
        torch.testing.assert_close((state.x * state.size[..., None]).sum(dim=1), x.sum(dim=1),
                                   atol=1e-4, rtol=1e-5)
        real = state.index[:, prefix:]
        assert all(len(set(row.tolist())) == row.numel() for row in real)
    assert state.tokens - prefix >= 1


def test_state_replace_changes_only_the_named_fields_and_refuses_unknown_ones():
    state = TokenState.start(torch.randn(2, 5, 3), prefix=1)
    size = torch.ones(2, 5)
    changed = state.replace(size=size)
    assert changed is not state and changed.size is size and state.size is None
    assert all(getattr(changed, name) is getattr(state, name) for name in ("x", "index", "prefix", "trace"))
    expected = dataclasses.replace(state, size=size)  # the dataclass' own replace
    assert all(getattr(changed, f.name) is getattr(expected, f.name) for f in dataclasses.fields(TokenState))
    with pytest.raises(TypeError, match="no field sizes"):
        state.replace(sizes=size)

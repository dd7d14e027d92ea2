"""The registry of tests/registry.py lists every method, and says true things about methods and hosts."""

import pytest
from models import forward, host_model, images, sam_model
from registry import HOSTS, REGISTRY, Entry, given

import tokensieve as ts


def test_every_method_tokensieve_exports_is_registered():
    exported = {getattr(ts, name) for name in ts.__all__}
    methods = {obj for obj in exported if isinstance(obj, type) and issubclass(obj, ts.Method)} - {ts.Method}
    assert methods, "expected tokensieve to export its methods"
    assert methods <= {type(entry.pruned) for entry in REGISTRY}


def test_registry_names_are_unique():
    names = [entry.name for entry in REGISTRY]
    assert len(set(names)) == len(names)


def _kept(model, method) -> list[list[int]]:
    ts.patch(model, method, dense=type(model).__name__.startswith("Sam"))
    with ts.trace(model) as traces, given(model, 2):
        forward(model, images(2))
    return traces[0].kept_tokens().tolist()


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda entry: entry.name)
def test_each_entry_prunes_with_its_pruned_config_and_keeps_every_token_with_pruning_off(entry: Entry):
    model = sam_model() if entry.map_only else host_model("timm-vit")
    tokens = 64 if entry.map_only else 1 + 64
    variants = [entry.pruned, entry.off] + ([entry.ragged] if entry.ragged else [])
    assert all(type(method) is type(entry.pruned) for method in variants)
    assert not entry.pruned.ragged and not entry.off.ragged
    assert entry.ragged is None or entry.ragged.ragged
    blocks = model.layers if entry.map_only else model.blocks
    assert _kept(model, entry.off) == [[tokens, tokens]] * len(blocks)
    assert max(_kept(model, entry.pruned)[-1]) < tokens


@pytest.mark.parametrize("host", HOSTS)
def test_host_table_says_what_the_library_finds(host):
    traits = HOSTS[host]
    sieve = ts.patch(host_model(host), ts.ToMe(r=0))
    assert sieve.spec.has_class_token == traits.class_token
    assert sieve.spec.dense_only == traits.positional
    refused = False
    try:
        ts.patch(host_model(host), ts.TopK(mass=0.6, layers=(1,)))
    except ValueError as error:
        assert "fixed keep rate" in str(error)
        refused = True
    assert refused == traits.mean_pooled

"""patch / unpatch: attach a method to a model in place, and take it off again."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

from torch import nn

from tokensieve.executor import Runner
from tokensieve.hosts import resolve_host
from tokensieve.methods import Method
from tokensieve.spec import ModelSpec
from tokensieve.tokens import Trace

_ATTRIBUTE = "_tokensieve"


class Sieve(nn.Module):
    """The handle of a patched model: the method, and its learnable parts as this module's
    parameters (kept off the host's state dict, so checkpoints of either stay separate)."""

    def __init__(self, method: Method, runner: Runner) -> None:
        super().__init__()
        self.method = method
        self.parts = runner.parts
        self.runner = runner

    @property
    def spec(self) -> ModelSpec:
        return self.runner.host.spec

    def extra_repr(self) -> str:
        return f"method={self.method!r}, host={self.spec.family!r}"


def patch(model: nn.Module, method: Method, attention: Literal["sdpa", "eager"] = "sdpa",
          dense: bool = False) -> Sieve:
    """Run `model`'s blocks through tokensieve with `method`; weights and state-dict keys stay.

    Patching a patched model replaces its method. `attention="eager"` spells attention out as
    matmuls (for FLOP counters); the default uses PyTorch's fused kernel. With `dense`, the
    last block returns every input token in input order, pruned ones holding the features they
    had when pruned and merged ones (ToMe) the features of the token they were merged into, so
    necks, mask decoders and heads that reshape tokens into a map work. Hosts whose output is read
    by input position (SAM's image encoder feeds its neck; CLIP's text tower pools each text's end
    token) always run dense, whatever `dense` says.
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a tokensieve method such as EViT(keep=0.7), got {type(method).__name__}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention={attention!r}: use 'sdpa' or 'eager'")
    host = resolve_host(model)
    if method.ragged and host.mean_pooled:
        raise ValueError(f"{method} keeps a different token count per image, and this model's head "
                         "averages the tokens, which would average padding in; use a fixed keep rate")
    if host.spec.dense_only and not method.keeps_positions:
        raise ValueError(f"{method} merges tokens, and {host.spec.family} needs the features of every "
                         "position (its output is read by position); use a method that drops or freezes "
                         "tokens (DynamicViT, or TopK and EViT where there is a class token)")
    dense = dense or host.spec.dense_only
    parts = method.bind(host.spec)
    unpatch(model)
    runner = Runner(host, method, parts, eager=attention == "eager", dense=dense)
    for layer, block in enumerate(host.blocks):
        runner.replaced[layer] = block.__dict__.get("forward")
        block.forward = functools.partial(runner.run, layer)
    if host.entry is not None:
        runner.replaced_entry = host.entry.__dict__.get("forward")
        host.entry.forward = functools.partial(runner.enter, host.entry.forward)
    sieve = Sieve(method, runner)
    object.__setattr__(model, _ATTRIBUTE, sieve)  # not a submodule: the state dict stays the host's
    return sieve


def unpatch(model: nn.Module) -> None:
    """Restore the model's own block forwards. A no-op on a model that is not patched."""
    sieve = model.__dict__.pop(_ATTRIBUTE, None)
    if sieve is None:
        return
    runner = sieve.runner
    for layer, block in enumerate(runner.host.blocks):
        block.__dict__.pop("forward", None)
        if runner.replaced.get(layer) is not None:  # an instance forward that was there before us
            block.forward = runner.replaced[layer]
    entry = runner.host.entry
    if entry is not None:
        entry.__dict__.pop("forward", None)
        if runner.replaced_entry is not None:
            entry.forward = runner.replaced_entry


def is_patched(model: nn.Module) -> bool:
    return _ATTRIBUTE in model.__dict__


def sieve_of(model: nn.Module) -> Sieve:
    """The Sieve attached to `model`, or a ValueError if it is not patched."""
    sieve = model.__dict__.get(_ATTRIBUTE)
    if sieve is None:
        raise ValueError("this model is not patched; call tokensieve.patch(model, method) first")
    return sieve


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[None]:
    """Run the patched `model` dense inside the block (this thread only): the host's output,
    from the same weights. Used as the teacher in self-distillation."""
    runner = sieve_of(model).runner
    before = runner.pruning
    runner.pruning = False
    try:
        yield
    finally:
        runner.pruning = before


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[list[Trace]]:
    """Collect the Trace of every forward of `model` inside the block: kept tokens per layer
    per sample, the positions kept, and each method's extra MACs."""
    collector: list[Trace] = []
    runner = sieve_of(model).runner
    runner.collectors.append(collector)
    try:
        yield collector
    finally:
        runner.collectors.remove(collector)

"""patch / unpatch: attach a method to a model in place, and take it off again."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Literal

from torch import Tensor, nn

from tokensieve.executor import Runner
from tokensieve.hosts import Host, resolve_host
from tokensieve.methods import Method
from tokensieve.methods.run import refuse_unknown
from tokensieve.spec import ModelSpec
from tokensieve.tokens import Trace

_ATTRIBUTE = "_tokensieve"


class Sieve(nn.Module):
    """The handle of a patch: the method, and its learnable parts as this module's parameters
    (kept off the hosts' state dicts, so checkpoints of either stay separate). `parts[i]` are the
    parts of the i-th patched module (an empty module when it has none), `shared` those every
    patched module uses (None: none)."""

    def __init__(self, method: Method, runners: Sequence[Runner], shared: nn.Module | None) -> None:
        super().__init__()
        self.method = method
        self.parts = nn.ModuleList(r.parts if r.parts is not None else nn.Module() for r in runners)
        self.shared = shared
        self.runners = list(runners)

    @property
    def specs(self) -> list[ModelSpec]:
        """The ModelSpec of each patched module, in patch order."""
        return [runner.host.spec for runner in self.runners]

    @property
    def spec(self) -> ModelSpec:
        """The patched module's ModelSpec (a handle of one module)."""
        if len(self.runners) > 1:
            raise ValueError(f"this handle spans {len(self.runners)} modules; read .specs")
        return self.runners[0].host.spec

    @property
    def runner(self) -> Runner:
        """The Runner of the patched module (a handle of one module)."""
        if len(self.runners) > 1:
            raise ValueError(f"this handle spans {len(self.runners)} modules; use runner_of(module)")
        return self.runners[0]

    def extra_repr(self) -> str:
        families = ", ".join(repr(spec.family) for spec in self.specs)
        return f"method={self.method!r}, hosts=[{families}]"


def patch(model: nn.Module | Sequence[nn.Module], method: Method,
          attention: Literal["sdpa", "eager"] = "sdpa", dense: bool = False) -> Sieve:
    """Run `model`'s blocks through tokensieve with `method`; weights and state-dict keys stay.

    `model` may be a list of modules (e.g. `[blip.vision_model, blip.text_encoder]`): the method is
    patched onto each, and the handle returned spans them all: its parameters are each module's
    parts and the parts they share (`Method.bind_shared`), each module records its own trace, and
    `unpatch` on any of them takes the method off all of them.

    Patching a patched model replaces its method. `attention="eager"` spells attention out as
    matmuls (for FLOP counters); the default uses PyTorch's fused kernel. With `dense`, every
    block returns every input token in input order, pruned ones holding the features they had
    when pruned and merged ones (ToMe) the features of the token they were merged into, so necks,
    mask decoders and heads that reshape tokens into a map work, and so do intermediate features
    (timm's `forward_intermediates`, which a sparse patch refuses unless pruning is disabled;
    transformers' `output_hidden_states`). Hosts whose output is read by input position (SAM's image encoder
    feeds its neck; CLIP's text tower pools each text's end token) always run dense, whatever
    `dense` says.
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a tokensieve method such as EViT(keep=0.7), got {type(method).__name__}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention={attention!r}: use 'sdpa' or 'eager'")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or len({id(m) for m in models}) != len(models):
        raise ValueError("patch takes a module, or a list of distinct modules")
    hosts = [_checked_host(m, method) for m in models]
    parts = [method.bind(host.spec) for host in hosts]
    shared = method.bind_shared([host.spec for host in hosts])
    for m in models:
        unpatch(m)
    runners = [Runner(host, method, module_parts, eager=attention == "eager",
                      dense=dense or host.spec.dense_only, shared=shared, module=i)
               for i, (host, module_parts) in enumerate(zip(hosts, parts, strict=True))]
    sieve = Sieve(method, runners, shared)
    for runner in runners:
        runner.together = runners
    for m, runner in zip(models, runners, strict=True):
        runner.patched = m
        _attach(runner)
        object.__setattr__(m, _ATTRIBUTE, sieve)  # not a submodule: the state dict stays the host's
    return sieve


def _checked_host(model: nn.Module, method: Method) -> Host:
    host = resolve_host(model)
    if method.ragged and host.mean_pooled:
        raise ValueError(f"{method} keeps a different token count per image, and this model's head "
                         "averages the tokens, which would average padding in; use a fixed keep rate")
    if host.spec.dense_only and not method.keeps_positions:
        raise ValueError(f"{method} merges tokens, and {host.spec.family} needs the features of every "
                         "position (its output is read by position); use a method that drops or freezes "
                         "tokens (DynamicViT, or TopK and EViT where there is a class token)")
    return host


def _attach(runner: Runner) -> None:
    host = runner.host
    for layer, block in enumerate(host.blocks):
        runner.replaced[layer] = block.__dict__.get("forward")
        block.forward = functools.partial(runner.run, layer)
    if host.entry is not None:
        runner.replaced_entry = host.entry.__dict__.get("forward")
        host.entry.forward = functools.partial(runner.enter, host.entry.forward)
    if not runner.dense:
        for name in host.intermediates:
            runner.replaced_methods[name] = runner.patched.__dict__.get(name)
            setattr(runner.patched, name, functools.partial(_sparse_intermediates, runner, name))


def _sparse_intermediates(runner: Runner, name: str, *args: object, **kwargs: object) -> object:
    """The model's own `name` while pruning is disabled (every block then returns every token in
    input order), else a refusal: the blocks of a sparse patch return only the tokens they keep."""
    if runner.scope().pruning:
        raise ValueError(f"{name} reads every block's output as the whole token grid, and the blocks of a "
                         "sparse patch return only the tokens they keep; patch with dense=True (each block "
                         "then returns every input position, pruned ones with the features they had when "
                         "pruned), or call it inside tokensieve.pruning_disabled(model)")
    model = runner.patched
    own = runner.replaced_methods.get(name)  # an instance attribute the model had before the patch
    return own(*args, **kwargs) if own is not None else getattr(type(model), name)(model, *args, **kwargs)


def unpatch(model: nn.Module) -> None:
    """Restore the model's own block forwards (and those of every module patched with it by the
    same `patch` call). A no-op on a model that is not patched."""
    sieve = model.__dict__.get(_ATTRIBUTE)
    if sieve is None:
        return
    for runner in sieve.runners:
        runner.patched.__dict__.pop(_ATTRIBUTE, None)
        _detach(runner)


def _detach(runner: Runner) -> None:
    for layer, block in enumerate(runner.host.blocks):
        block.__dict__.pop("forward", None)
        if runner.replaced.get(layer) is not None:  # an instance forward that was there before us
            block.forward = runner.replaced[layer]
    entry = runner.host.entry
    if entry is not None:
        entry.__dict__.pop("forward", None)
        if runner.replaced_entry is not None:
            entry.forward = runner.replaced_entry
    if not runner.dense:
        for name in runner.host.intermediates:
            runner.patched.__dict__.pop(name, None)
            if runner.replaced_methods.get(name) is not None:
                setattr(runner.patched, name, runner.replaced_methods[name])


def is_patched(model: nn.Module) -> bool:
    return _ATTRIBUTE in model.__dict__


def sieve_of(model: nn.Module) -> Sieve:
    """The Sieve attached to `model`, or a ValueError if it is not patched."""
    sieve = model.__dict__.get(_ATTRIBUTE)
    if sieve is None:
        raise ValueError("this model is not patched; call tokensieve.patch(model, method) first")
    return sieve


def patched_within(model: nn.Module) -> tuple[list[nn.Module], Sieve | None]:
    """The modules of `model` (itself included, or e.g. a task model's towers or a detector's ViT)
    that are patched, and the one handle that patched them (None: nothing is); a ValueError when
    several patch calls did, since the caller must then say which (`sieve=...`)."""
    patched = [m for m in model.modules() if is_patched(m)]
    handles = {id(sieve_of(m)) for m in patched}
    if len(handles) > 1:
        raise ValueError(f"modules of this model are patched by {len(handles)} separate patch calls; pass "
                         "sieve=... to say which method is meant (or patch them in one call to train one "
                         "method over all of them)")
    return patched, sieve_of(patched[0]) if patched else None


def runner_of(model: nn.Module) -> Runner:
    """The Runner that stands in for the blocks of the patched `model`."""
    sieve = sieve_of(model)
    for runner in sieve.runners:
        if runner.patched is model:
            return runner
    raise ValueError("this model's handle does not run it")  # cannot happen: patch links both ways


@contextlib.contextmanager
def pruning_disabled(model: nn.Module) -> Iterator[None]:
    """Run the patched `model` dense inside the block (this thread only): the host's output,
    from the same weights. Used as the teacher in self-distillation."""
    scope = runner_of(model).scope()
    before = scope.pruning
    scope.pruning = False
    try:
        yield
    finally:
        scope.pruning = before


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[list[Trace]]:
    """Collect the Trace of every forward of `model` inside the block: kept tokens per layer
    per sample, the positions kept, and each method's extra MACs."""
    collector: list[Trace] = []
    scope = runner_of(model).scope()
    scope.collectors.append(collector)
    try:
        yield collector
    finally:
        scope.collectors.remove(collector)


@contextlib.contextmanager
def inputs(model: nn.Module, **tensors: Tensor) -> Iterator[None]:
    """Give every forward call of `model` inside the block the per-call inputs its method reads
    (`Method.call_inputs`), e.g. `with ts.inputs(model, guidance=g): model(x)`. `model` is a
    patched module or a model that contains patched modules (each gets the inputs). Checked when
    each call starts (missing, wrong width or batch size: ValueError); this thread only; nothing
    stays on the model after the block."""
    runners = [runner_of(m) for m in model.modules() if is_patched(m)]
    if not runners:
        raise ValueError("this model is not patched and contains no patched module; call "
                         "tokensieve.patch(model, method) first")
    for runner in runners:
        refuse_unknown(runner.method.call_inputs(runner.host.spec), tensors, str(runner.method))
    scopes = [runner.scope() for runner in runners]
    for scope in scopes:
        scope.inputs.append(dict(tensors))
    try:
        yield
    finally:
        for scope in scopes:
            scope.inputs.pop()


def output_mask(model: nn.Module) -> Tensor | None:
    """[B, N] long: 1 on the rows the patched `model`'s last forward in this thread returned that
    are tokens, 0 on padding (a ragged batch's); None before its first forward. transformers'
    mask convention, for a text encoder that cross-attends to that output."""
    valid = runner_of(model).scope().output_valid
    return None if valid is None else valid.long()


def call_input_names(model: nn.Module) -> frozenset[str]:
    """The per-call inputs the methods patched in `model` read (`Method.call_inputs`); empty when
    none is patched or none reads any."""
    runners = [runner_of(m) for m in model.modules() if is_patched(m)]
    return frozenset(spec.name for runner in runners for spec in runner.method.call_inputs(runner.host.spec))


@contextlib.contextmanager
def method_timing(model: nn.Module) -> Iterator[list[float]]:
    """Time the method's own steps in `model`'s forwards inside the block (this thread only): the
    list yielded holds their total seconds once the block ends."""
    scope = runner_of(model).scope()
    seconds: list[float] = []
    before, scope.method_seconds = scope.method_seconds, 0.0
    try:
        yield seconds
    finally:
        seconds.append(scope.method_seconds)
        scope.method_seconds = before

"""A method's run: one forward call of a patched module as the method sees it, and the inputs it reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from tokensieve.spec import ModelSpec
from tokensieve.tokens import Trace


@dataclass(frozen=True)
class CallInput:
    """A tensor a method reads from every forward call (e.g. a sentence's embedding), given for
    the call with `tokensieve.inputs(model, name=tensor)`."""

    name: str
    width: int | None = None  # size of the last dimension; None: any
    shapes: tuple[str, ...] = ("[B, D]", "[B, T, D]")  # the accepted layouts, batch first
    required: bool = True

    def check(self, value: Any, batch: int, method: str) -> None:
        """Refuse a value of the wrong type, rank, batch size or width, naming the fix."""
        expected = " or ".join(self.shapes).replace("D", str(self.width) if self.width else "D")
        if not isinstance(value, Tensor):
            raise ValueError(f"{method} reads the per-call input {self.name!r} as a tensor {expected}, "
                             f"got {type(value).__name__}")
        ranks = {shape.count(",") + 1 for shape in self.shapes}
        if value.dim() not in ranks:
            raise ValueError(f"{method}: the per-call input {self.name!r} is {tuple(value.shape)}; give it "
                             f"as {expected}")
        if value.shape[0] != batch:
            raise ValueError(f"{method}: the per-call input {self.name!r} has {value.shape[0]} rows and the "
                             f"call has {batch} samples; give one row per sample ({expected})")
        if self.width is not None and value.shape[-1] != self.width:
            raise ValueError(f"{method}: the per-call input {self.name!r} is {value.shape[-1]} wide and the "
                             f"method reads {self.width}; give {expected} (or configure the method for "
                             f"width {value.shape[-1]})")


def check_inputs(declared: Sequence[CallInput], given: Mapping[str, Any], batch: int,
                 method: str) -> dict[str, Tensor]:
    """The inputs of one call, checked against what the method declares (`Method.call_inputs`)."""
    refuse_unknown(declared, given.keys(), method)
    for spec in declared:
        if spec.name in given:
            spec.check(given[spec.name], batch, method)
        elif spec.required:
            raise ValueError(f"{method} needs the per-call input {spec.name!r} for every forward; call the "
                             f"model inside `with tokensieve.inputs(model, {spec.name}=tensor):`")
    return dict(given)


def refuse_unknown(declared: Sequence[CallInput], names: Iterable[str], method: str) -> None:
    """Refuse input names the method does not read, naming those it does."""
    reads = {spec.name for spec in declared}
    unknown = sorted(set(names) - reads)
    if unknown:
        listed = ", ".join(sorted(reads)) or "no per-call inputs"
        raise ValueError(f"{method} reads {listed}; it does not read {', '.join(unknown)}")


@dataclass(eq=False)
class MethodRun:
    """One forward call of a patched module, as its method sees it: made when the call enters the
    first block, handed to every step of the call, dropped when the call returns.

    `parts` are the method's learnable modules for this module (None: none), `shared` those shared
    by every module the method was patched onto; `inputs` the call's checked per-call inputs;
    `scratch` is the method's own per-call state (what one step leaves for a later one).
    """

    spec: ModelSpec
    parts: nn.Module | None
    shared: nn.Module | None
    training: bool  # mask mode: differentiable decisions, dense compute
    inputs: dict[str, Tensor]
    trace: Trace
    module: int = 0  # which of the handle's patched modules runs the call
    scratch: dict[str, Any] = field(default_factory=dict)

    def report(self, name: str, value: Any) -> None:
        """Keep `value` with the call's trace, for the method's losses (`Method.losses`)."""
        self.trace.reports[name] = value

    def append_report(self, name: str, value: Any) -> None:
        """Add `value` to the call's tuple of reports `name` (one per stage, in order)."""
        # A new tuple each time: a block run again by activation checkpointing starts from a blank
        # trace, and must not add to the one the forward filled.
        self.report(name, (*self.trace.reports.get(name, ()), value))

"""ToMe: merge the r most similar tokens in every block, between attention and MLP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tokensieve import ops
from tokensieve.methods.base import AttentionView, Method, MethodRun
from tokensieve.methods.fields import check_layers, count, layer_indices, optional, real, settle
from tokensieve.ops.matching import matching_macs
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState

Schedule = int | tuple[int, float] | list[int]


def merge_schedule(r: Schedule, depth: int) -> list[int]:
    """Tokens merged per block. `r` is a constant, a per-block list (padded with zeros), or
    (r, inflect): a straight line averaging r, from int(r * (1 - inflect)) at the first block
    to 2r minus that at the last (negative inflect merges more early, as in ToMe)."""
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"ToMe(r={r}): a tuple is (r, inflect); give a list for per-block values")
        base, inflect = r
        first = int(base * (1.0 - inflect))
        last = 2 * base - first
        step = (last - first) / max(depth - 1, 1)
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, int):
        return [r] * depth
    schedule = [int(v) for v in r]
    if len(schedule) > depth:
        raise ValueError(f"ToMe(r=...) lists {len(schedule)} values for a model of {depth} blocks; "
                         f"give at most {depth}")
    return schedule + [0] * (depth - len(schedule))


def read_schedule(value: Any, name: str) -> Schedule:
    """A schedule as `merge_schedule` takes it: an int >= 0, (r, inflect) as (int, float), or a
    per-block list of ints >= 0. A string is refused, never split into per-block values."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} is the number of tokens merged per block, and a string is not split into "
                        f"per-block values; write {name}=13, without quotes, or a list such as "
                        f"{name}=[8, 8, 4]")
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"a tuple is ({name}, inflect); give a list for per-block values")
        return _item(count, value[0], name, f"a tuple is ({name}, inflect), e.g. {name}=(8, -0.5)"), \
            _item(real, value[1], name, f"a tuple is ({name}, inflect), e.g. {name}=(8, -0.5)")
    if isinstance(value, Iterable):
        return [_item(count, v, name, f"a per-block list holds whole numbers >= 0, e.g. {name}=[8, 8, 4]")
                for v in value]
    return _item(count, value, name, f"{name} is a whole number of tokens merged per block, e.g. {name}=8")


def _item(read: Callable[[Any, str], Any], value: Any, name: str, form: str) -> Any:
    """One item of a schedule, its error naming the schedule's form."""
    try:
        return read(value, name)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{form}; {value!r} does not fit") from None


def max_merge(tokens: int) -> int:
    """Most tokens one block merges away from `tokens` non-prefix tokens: half of them."""
    return tokens // 2


@dataclass(frozen=True)
class ToMe(Method):
    """Bipartite soft matching on the keys (mean over heads) in each of `layers` (default: all).

    As in the authors' code, the whole sequence alternates between sets A (even positions) and
    B (odd), the class token included, so behind one class token the patch tokens at odd positions
    form B. Every prefix token (class, distillation, registers) sits in the set its position puts
    it in and takes part in no match, and the prefix stays first: for DeiT's class and
    distillation tokens this is what the authors do; registers are protected the same way.
    Merged tokens are size-weighted averages; attention adds log(size) to the keys
    (proportional attention), and heads that average the patch tokens weight them by size.
    As in ToMe, a block merges at most half of its unprotected tokens, so late blocks of a large
    constant r merge fewer.
    """

    r: Schedule = 8
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        settle(self, r=read_schedule, layers=optional(layer_indices))

    @property
    def keeps_positions(self) -> bool:
        return False  # a merged token stands for several positions (dense mode copies it back to each)

    def schedule(self, depth: int) -> list[int]:
        per_layer = merge_schedule(self.r, depth)
        if self.layers is not None:
            chosen = set(check_layers(self.layers, depth, "ToMe"))
            per_layer = [v if i in chosen else 0 for i, v in enumerate(per_layer)]
        if any(v < 0 for v in per_layer):
            raise ValueError(f"ToMe(r={self.r}) gives a negative merge count; use r >= 0")
        return per_layer

    def bind(self, spec: ModelSpec) -> nn.Module | None:
        self._check_fits(max(self.schedule(spec.depth)), spec.input_tokens - spec.prefix)
        return None

    def _check_fits(self, r: int, tokens: int) -> None:
        if r > max_merge(tokens):
            raise ValueError(f"ToMe(r={self.r}) merges {r} tokens in one block, more than half of the "
                             f"{tokens} input tokens; lower r to at most {max_merge(tokens)}")

    def after_attention(self, layer: int, state: TokenState, attn: AttentionView,
                        run: MethodRun) -> TokenState:
        per_layer = self.schedule(run.spec.depth)
        r = per_layer[layer]
        if r == 0:
            return state
        if state.valid is not None:
            raise ValueError("ToMe merges equal token counts; it cannot run on a padded batch or follow a "
                             "ragged selection")
        tokens = state.tokens - state.prefix
        if state.size is None:  # the first merge of this call: the input size decides what fits
            self._check_fits(r, tokens)
        r = min(r, max_merge(tokens))
        if r == 0:
            return state
        if state.trace is not None:
            state.trace.add_overhead("matching", matching_macs(tokens, attn.k.shape[-1]))
        plan = ops.bipartite_merge(attn.key_metric(), r, state.prefix)
        # Sizes stay float32: in half precision, counts above 256 would no longer be exact.
        x, size = plan.average(state.x, state.size)
        source = None
        if state.grid is not None:  # dense mode: follow every input position to its merged token
            source = plan.destinations().gather(1, state.sources())
        return state.replace(x=x, size=size, index=state.index.gather(1, plan.survivors), source=source)

"""Runs the host's blocks over a TokenState and calls the method at its layers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.hosts import Host, runs_own_attention
from tokensieve.methods import AttentionView, Method, RunContext
from tokensieve.tokens import LayerRecord, TokenState, Trace, repeat_by_size


class Runner:
    """Stands in for each block's forward. Block i hands its TokenState to block i+1 through a
    per-thread relay keyed on the tensor it returned, so the host's own loop over blocks (and
    whatever entry point started it) drives the pruned forward; the state dies with the call.
    """

    def __init__(self, host: Host, method: Method, parts: nn.Module | None, eager: bool,
                 dense: bool = False) -> None:
        self.host, self.method, self.parts, self.eager, self.dense = host, method, parts, eager, dense
        self.last_layer = len(host.blocks) - 1
        self.method_seconds: float | None = None  # set to 0.0 to time the method's own steps
        self.replaced: dict[int, Callable | None] = {}  # layer -> instance forward found at patch time
        self._local = threading.local()  # relay and trace collectors, one set per thread

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = None  # per-call data is never copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def pruning(self) -> bool:
        """False inside a `tokensieve.pruning_disabled` scope of this thread."""
        return getattr(self._local, "pruning", True)

    @pruning.setter
    def pruning(self, enabled: bool) -> None:
        self._local.pruning = enabled

    @property
    def collectors(self) -> list[list[Trace]]:
        """The open `tokensieve.trace` scopes of this thread."""
        local = self._local
        if not hasattr(local, "collectors"):
            local.collectors = []
        return local.collectors

    def run(self, layer: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Block `layer`'s forward. `x` is [B, N, C] tokens, or a [B, H, W, C] map (SAM) that the
        first block flattens into tokens and the last block gives back whole (dense mode)."""
        _check_block_arguments(args, kwargs)
        relay = self._local
        state = getattr(relay, "state", None) if layer > 0 and getattr(relay, "out", None) is x else None
        relay.state = relay.out = None
        if state is None:
            self._follow_input(x)
            state = TokenState.start(x, self.host.spec.prefix, dense=self.dense)
        state = self._run_block(layer, state)
        if layer == self.last_layer:
            return self._finish(state)
        relay.state, relay.out = state, state.x
        return state.x

    def _run_block(self, layer: int, state: TokenState) -> TokenState:
        method = self.method if self.pruning else _DENSE
        view = self.host.views[layer]
        ctx = RunContext(self.host.spec, self.parts, self.host.blocks[layer].training)
        record = LayerRecord(layer, 0, 0, state.index, state.valid)
        if state.trace is not None:
            state.trace.layers.append(record)
        state = self._call_method(method.before_block, layer, state, ctx)
        block_input = state.x
        record.attention_tokens = state.token_counts()
        if runs_own_attention(view):  # windows or relative positions: the view places the tokens
            heads_out, q, k = view.attend(block_input, state, self.eager)  # [B, N, H*d]
            record.attention_macs = view.attention_macs(state.index, state.valid, state.map_size)
            bias = _attention_bias(state, q.dtype)
        else:
            q, k, v = view.qkv(block_input)
            bias = _attention_bias(state, q.dtype)
            if state.keep is not None:
                heads_out = ops.policy_attention(q, k, v, state.keep, view.scale)
            else:
                heads_out = ops.attention(q, k, v, bias, view.scale, view.attention_dropout(), self.eager)
            batch, heads, tokens, dim = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        x = block_input + view.attention_branch(heads_out)
        state = state.replace(x=x)
        attn = AttentionView(q, k, bias, view.scale, state)
        state = self._call_method(method.after_attention, layer, state, attn, ctx)
        record.mlp_tokens = state.token_counts()
        x = state.x + view.mlp_branch(state.x)
        if state.keep is not None:  # mask mode: pruned tokens pass through the block unchanged
            keep = state.keep[..., None]
            x = keep * x + (1.0 - keep) * block_input
        record.index, record.valid = state.index, state.valid
        return state.replace(x=x)

    def _call_method(self, step: Callable[..., TokenState], *args: Any) -> TokenState:
        if self.method_seconds is None:
            return step(*args)
        start = time.perf_counter()
        state = step(*args)
        self.method_seconds += time.perf_counter() - start
        return state

    def _finish(self, state: TokenState) -> Tensor:
        for traces in self.collectors:
            traces.append(state.trace)
        if state.grid is not None:
            return state.dense_output()
        if self.host.mean_pooled and state.size is not None:
            return repeat_by_size(state)
        return state.x

    def _follow_input(self, x: Tensor) -> None:
        """Keep the method's own parameters on the device and dtype of the activations."""
        if self.parts is None:
            return
        param = next(self.parts.parameters(), None)
        if param is not None and (param.device != x.device or param.dtype != x.dtype):
            self.parts.to(device=x.device, dtype=x.dtype)


_DENSE = Method()  # does nothing at any layer


def _attention_bias(state: TokenState, dtype: torch.dtype) -> Tensor | None:
    """Key mask or additive bias [B, 1, 1, N]: padding excluded, merged tokens weighted by size."""
    if state.size is None:
        return None if state.valid is None else state.valid[:, None, None, :]
    bias = state.size.to(dtype).log()
    if state.valid is not None:
        bias = bias.masked_fill(~state.valid, -torch.inf)
    return bias[:, None, None, :]


def _check_block_arguments(args: tuple, kwargs: dict) -> None:
    """Refuse what a patched block would otherwise silently ignore."""
    masks = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if masks or kwargs.get("is_causal"):
        raise ValueError("a patched block takes no attention mask; unpatch the model to run masked attention")
    if kwargs.get("output_attentions"):
        raise ValueError("a patched model does not return attention maps; use tokensieve.trace for the "
                         "kept tokens, or unpatch the model to get its attentions")

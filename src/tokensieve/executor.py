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
from tokensieve.hosts.base import BlockCall, BlockView, Step
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
        self.replaced_entry: Callable | None = None  # the same, for the host's entry module
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
        _refuse_attention_maps(kwargs)
        relay = self._local
        continuing = layer > 0 and getattr(relay, "out", None) is x
        state = getattr(relay, "state", None) if continuing else None
        call = getattr(relay, "call", None) if continuing else None
        relay.state = relay.out = relay.call = None
        if state is None:
            # The host's masks and memory are read once per forward: every block of a call gets the same.
            call = self.host.read_call(x, args, kwargs, self._entry_inputs(x))
            self._follow_input(x)
            state = TokenState.start(x, self.host.spec.prefix, dense=self.dense, valid=call.key_mask,
                                     order=call.order)
        state = self._run_block(layer, state, call)
        if layer == self.last_layer:
            return self._finish(state)
        relay.state, relay.out, relay.call = state, state.x, call
        return state.x

    def enter(self, forward: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """Stands in for the host's entry module (the module whose output enters the first block):
        runs it, and keeps what the host reads from its inputs for the first block of this call."""
        out = forward(*args, **kwargs)
        self._local.entry = (out, self.host.read_entry(args, kwargs))
        return out

    def _entry_inputs(self, x: Tensor) -> Any:
        """What the entry module's call that produced `x` carried (e.g. token ids), else None."""
        entry = getattr(self._local, "entry", None)
        self._local.entry = None
        return entry[1] if entry is not None and entry[0] is x else None

    def _run_block(self, layer: int, state: TokenState, call: BlockCall) -> TokenState:
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
            bias = _attention_bias(state, q.dtype, call.causal)
        else:
            q, k, v = view.qkv(block_input)
            bias = _attention_bias(state, q.dtype, call.causal)
            if state.keep is not None:
                heads_out = ops.policy_attention(q, k, v, state.keep, view.scale, bias)
            else:
                heads_out = ops.attention(q, k, v, bias, view.scale, view.attention_dropout(), self.eager)
            batch, heads, tokens, dim = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        x = _residual(block_input, view.attention_branch(heads_out))
        state = state.replace(x=_norm_after(view, "attention", x))
        attn = AttentionView(q, k, bias, view.scale, state)
        state = self._call_method(method.after_attention, layer, state, attn, ctx)
        # Free the attention's buffers before the MLP allocates its own, as the host's block does:
        # a larger live set makes the allocator return and re-fault pages on every call.
        attn = q = k = v = heads_out = x = None
        if state.keep is None:
            block_input = None
        record.mlp_tokens = state.token_counts()
        if call.memory is not None:
            state = state.replace(x=self._cross_attend(view, state.x, call))
            mask = call.memory_mask
            record.memory_tokens = call.memory.shape[1] if mask is None else mask.sum(dim=1)
        x = _norm_after(view, "mlp", _residual(state.x, view.mlp_branch(state.x)))
        if state.keep is not None:  # mask mode: pruned tokens pass through the block unchanged
            keep = state.keep[..., None]
            x = keep * x + (1.0 - keep) * block_input
        record.index, record.valid = state.index, state.valid
        return state.replace(x=x)

    def _cross_attend(self, view: BlockView, x: Tensor, call: BlockCall) -> Tensor:
        """The block's attention from its tokens to the call's memory (another modality's tokens)."""
        cross = getattr(view, "cross_attention", None)
        if cross is None:
            raise ValueError("this block has no cross-attention, but the call passes tokens to attend to "
                             "(encoder_hidden_states)")
        q = cross.query(x)
        k, v = cross.key_value(call.memory)
        bias = None if call.memory_mask is None else call.memory_mask[:, None, None, :]
        heads_out = ops.attention(q, k, v, bias, cross.scale, cross.attention_dropout(), self.eager)
        batch, heads, tokens, dim = heads_out.shape
        x = x + cross.branch(heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim))
        return _norm_after(view, "cross_attention", x)

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
        if state.grid is not None:  # every input position; only the input's own padding is padding
            out, valid = state.dense_output(), state.trace.input_valid
        elif self.host.mean_pooled and state.size is not None:
            out, valid = repeat_by_size(state), None
        else:
            out, valid = state.x, state.valid
        if valid is None:
            valid = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        state.trace.output_valid = valid
        return out

    def _follow_input(self, x: Tensor) -> None:
        """Keep the method's own parameters on the device and dtype of the activations."""
        if self.parts is None:
            return
        param = next(self.parts.parameters(), None)
        if param is not None and (param.device != x.device or param.dtype != x.dtype):
            self.parts.to(device=x.device, dtype=x.dtype)


_DENSE = Method()  # does nothing at any layer


def _attention_bias(state: TokenState, dtype: torch.dtype, causal: bool = False) -> Tensor | None:
    """Key mask or additive bias [B, 1, 1, N] ([B, 1, N, N] when causal): padding excluded, causal
    order kept by input position (`state.index`), merged tokens weighted by size."""
    if causal:
        positionless = state.index < 0  # fused tokens, and ragged padding (which is no key anyway)
        if state.valid is not None:
            positionless = positionless & state.valid
        if bool(positionless.any()):
            raise ValueError("this model attends causally, and a fused or merged token has no single input "
                             "position to attend from; use TopK, DynamicViT or EViT(fuse=False)")
        mask = ops.causal_mask(state.index, state.valid)
    else:
        mask = None if state.valid is None else state.valid[:, None, None, :]
    if state.size is None:
        return mask
    bias = state.size.to(dtype).log()[:, None, None, :]
    return bias if mask is None else bias.masked_fill(~mask, -torch.inf)


def _norm_after(view: BlockView, step: Step, x: Tensor) -> Tensor:
    """Post-norm (BERT-style) blocks normalise after each residual add; pre-norm views have no such step."""
    norm = getattr(view, "norm_after", None)
    return x if norm is None else norm(step, x)


def _residual(x: Tensor, update: Tensor) -> Tensor:
    """x + update; written into `update` (a fresh branch output) when no gradient is recorded,
    which saves a buffer per block. Addition commutes, so the result is the same to the bit."""
    if (not torch.is_grad_enabled() and update.shape == x.shape and update.dtype == x.dtype
            and update.is_contiguous() and update.data_ptr() != x.data_ptr()):
        return update.add_(x)
    return x + update


def _refuse_attention_maps(kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError("a patched model does not return attention maps; use tokensieve.trace for the "
                         "kept tokens, or unpatch the model to get its attentions")

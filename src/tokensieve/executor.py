"""Runs the host's blocks over a TokenState and calls the method at its layers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.hosts import Host, runs_own_attention
from tokensieve.hosts.base import BlockCall, BlockView, Step
from tokensieve.methods import AttentionView, Method, MethodRun
from tokensieve.methods.run import check_inputs
from tokensieve.tokens import LayerRecord, TokenState, Trace, repeat_by_size


@dataclass
class CallScope:
    """Everything per thread about one patched module's calls: the switches and collectors the
    user's context managers set, the call being run (handed from block to block), and what the
    entry module saw of it."""

    pruning: bool = True  # False inside `tokensieve.pruning_disabled`
    collectors: list[list[Trace]] = field(default_factory=list)  # open `tokensieve.trace` scopes
    inputs: list[dict[str, Any]] = field(default_factory=list)  # open `tokensieve.inputs` scopes, inner last
    method_seconds: float | None = None  # set to 0.0 to time the method's own steps
    entry: tuple[Tensor, Any] | None = None  # (entry module's output, what the host read from its inputs)
    call: _Call | None = None  # the call under way, and the tensor its last block returned
    out: Tensor | None = None


@dataclass
class _Call:
    """One forward call under way: its state, what the host's block call carries, the method's run."""

    state: TokenState
    block_call: BlockCall
    method: Method
    run: MethodRun


class Runner:
    """Stands in for each block's forward. Block i hands the call to block i+1 through the
    per-thread scope, keyed on the tensor it returned, so the host's own loop over blocks (and
    whatever entry point started it) drives the pruned forward; the call's state and the method's
    run die with the call.
    """

    def __init__(self, host: Host, method: Method, parts: nn.Module | None, eager: bool,
                 dense: bool = False, shared: nn.Module | None = None, module: int = 0) -> None:
        self.host, self.method, self.parts, self.eager, self.dense = host, method, parts, eager, dense
        self.shared, self.module = shared, module
        self.patched: nn.Module | None = None  # the module whose blocks this runner stands in for
        self.last_layer = len(host.blocks) - 1
        self.replaced: dict[int, Callable | None] = {}  # layer -> instance forward found at patch time
        self.replaced_entry: Callable | None = None  # the same, for the host's entry module
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = None  # per-call data is never copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def scope(self) -> CallScope:
        """This thread's CallScope."""
        scope = getattr(self._local, "scope", None)
        if scope is None:
            scope = self._local.scope = CallScope()
        return scope

    def run(self, layer: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Block `layer`'s forward. `x` is [B, N, C] tokens, or a [B, H, W, C] map (SAM) that the
        first block flattens into tokens and the last block gives back whole (dense mode)."""
        _refuse_attention_maps(kwargs)
        scope = self.scope()
        call = scope.call if layer > 0 and scope.out is x else None  # else: a new call starts here
        scope.call = scope.out = None
        if call is None:
            call = self._start(x, args, kwargs, scope)
        call.state = self._run_block(layer, call, scope)
        if layer == self.last_layer:
            return self._finish(call, scope)
        scope.call, scope.out = call, call.state.x
        return call.state.x

    def enter(self, forward: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """Stands in for the host's entry module (the module whose output enters the first block):
        runs it, and keeps what the host reads from its inputs for the first block of this call."""
        out = forward(*args, **kwargs)
        self.scope().entry = (out, self.host.read_entry(args, kwargs))
        return out

    def _start(self, x: Tensor, args: tuple, kwargs: dict, scope: CallScope) -> _Call:
        """A new call: the host's masks and memory (read once: every block of a call gets the same),
        the first TokenState, and the method's run with the call's inputs."""
        entry, scope.entry = scope.entry, None
        entry_inputs = entry[1] if entry is not None and entry[0] is x else None  # not another call's
        block_call = self.host.read_call(x, args, kwargs, entry_inputs)
        self._follow_input(x)
        method, inputs = _DENSE, {}
        if scope.pruning and x.shape[0] > 0:  # an empty batch has nothing to prune: it runs as the host
            method = self.method
            given = scope.inputs[-1] if scope.inputs else {}
            inputs = check_inputs(method.call_inputs(self.host.spec), given, x.shape[0], str(method))
        state = TokenState.start(x, self.host.spec.prefix, grid=self.dense or method.uses_grid,
                                 valid=block_call.key_mask, order=block_call.order)
        state.trace.module = self.module
        run = MethodRun(self.host.spec, self.parts, self.shared, self.host.blocks[0].training, inputs,
                        state.trace, self.module)
        state = self._step(scope, method.start, state, run)
        return _Call(state, block_call, method, run)

    def _run_block(self, layer: int, call: _Call, scope: CallScope) -> TokenState:
        method, run, state = call.method, call.run, call.state
        view = self.host.views[layer]
        record = LayerRecord(layer, 0, 0, state.index, state.valid)
        if state.trace is not None:
            state.trace.layers.append(record)
        state = self._step(scope, method.before_block, layer, state, run)
        block_input = state.x
        record.attention_tokens = state.token_counts()
        own_attention = runs_own_attention(view)
        if own_attention:  # windows or relative positions: the view places the tokens
            heads_out, q, k = view.attend(block_input, state, self.eager)  # [B, N, H*d]
            record.attention_index, record.attention_valid = state.index, state.valid
            bias = _attention_bias(state, q.dtype, call.block_call.causal)
        else:
            q, k, v = view.qkv(block_input)
            bias = _attention_bias(state, q.dtype, call.block_call.causal)
            if state.keep is not None:
                heads_out = ops.policy_attention(q, k, v, state.keep, view.scale, bias)
            else:
                heads_out = ops.attention(q, k, v, bias, view.scale, view.attention_dropout(), self.eager)
            batch, heads, tokens, dim = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        x = _residual(block_input, view.attention_branch(heads_out))
        state = state.replace(x=_norm_after(view, "attention", x))
        attn = AttentionView(q, k, bias, view.scale, state, exact=not own_attention)
        state = self._step(scope, method.after_attention, layer, state, attn, run)
        # Free the attention's buffers before the MLP allocates its own, as the host's block does:
        # a larger live set makes the allocator return and re-fault pages on every call.
        attn = q = k = v = heads_out = x = None
        if state.keep is None:
            block_input = None
        record.mlp_tokens = state.token_counts()
        block_call = call.block_call
        if block_call.memory is not None:
            state = state.replace(x=self._cross_attend(view, state.x, block_call))
            mask = block_call.memory_mask
            record.memory_tokens = block_call.memory.shape[1] if mask is None else mask.sum(dim=1)
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

    def _step(self, scope: CallScope, step: Callable[..., TokenState], *args: Any) -> TokenState:
        if scope.method_seconds is None:
            return step(*args)
        start = time.perf_counter()
        state = step(*args)
        scope.method_seconds += time.perf_counter() - start
        return state

    def _finish(self, call: _Call, scope: CallScope) -> Tensor:
        state = self._step(scope, call.method.finish, call.state, call.run)
        for traces in scope.collectors:
            traces.append(state.trace)
        if self.dense:  # every input position; only the input's own padding is padding
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
        for parts in (self.parts, self.shared):
            param = None if parts is None else next(parts.parameters(), None)
            if param is not None and (param.device != x.device or param.dtype != x.dtype):
                parts.to(device=x.device, dtype=x.dtype)


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

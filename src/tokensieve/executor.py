"""Runs the host's blocks over a TokenState and calls the method at its layers."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve import ops
from tokensieve.hosts import Host, runs_own_attention
from tokensieve.hosts.base import BlockCall, BlockView, Step, is_reentrant, layer_checkpointing
from tokensieve.methods import AttentionView, Method, MethodRun
from tokensieve.methods.base import token_queries
from tokensieve.methods.run import check_inputs
from tokensieve.tokens import NO_POSITION, LayerRecord, TokenState, Trace, gather_tokens, repeat_by_size


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
    handoff: _Handoff | None = None  # what the last block run in this thread handed to the next
    output_valid: Tensor | None = None  # [B, N_out] the rows the last call returned that are tokens


@dataclass
class _Opening:
    """What a call reads once, at its first block: what the host's block call carries (masks,
    memory), the method that runs (none with pruning off), the call's inputs, the mode."""

    block_call: BlockCall
    method: Method
    inputs: dict[str, Tensor]
    training: bool


@dataclass
class _Call:
    """One forward call under way: its state, what it read at its first block, the method's run."""

    state: TokenState
    opening: _Opening
    run: MethodRun


@dataclass
class _Handoff:
    """Block `layer` of `call` returned `out`; the next block continues the call with what it is given."""

    call: _Call
    layer: int
    out: Tensor


@dataclass
class _BlockStart:
    """How a block of a call began, kept while its input tensor lives: activation checkpointing
    runs the block again in the backward pass, where it must run as it did in the forward."""

    opening: _Opening
    state: TokenState | None  # as the previous block left it (None: the first block); sparse: without x
    replaced: bool  # the input is not what the previous block returned (a forward hook replaced it)
    scratch: dict[str, Any]  # the method's scratch as the block began
    trace: Trace  # a blank trace of the call's shape, copied for each rerun to write into


class Runner:
    """Stands in for each block's forward. Block i hands the call to block i+1 through the
    per-thread scope, and block i+1 takes the tensor it is given as block i's output (a forward
    hook may have replaced it), so the host's own loop over blocks (and whatever entry point
    started it) drives the pruned forward; the call's state and the method's run die with the
    call. A block run again in the backward pass (activation checkpointing) reruns from how it
    began in the forward, kept while its input tensor lives.
    """

    def __init__(self, host: Host, method: Method, parts: nn.Module | None, eager: bool,
                 dense: bool = False, shared: nn.Module | None = None, module: int = 0) -> None:
        self.host, self.method, self.parts, self.eager, self.dense = host, method, parts, eager, dense
        self.shared, self.module = shared, module
        self.patched: nn.Module | None = None  # the module whose blocks this runner stands in for
        self.together: list[Runner] = []  # the runners patched in the same call (e.g. the other tower)
        self.last_layer = len(host.blocks) - 1
        self.replaced: dict[int, Callable | None] = {}  # layer -> instance forward found at patch time
        self.replaced_entry: Callable | None = None  # the same, for the host's entry module
        self.replaced_methods: dict[str, Callable | None] = {}  # the same, for the model's intermediates
        self._local = threading.local()
        # (layer, id of its input) -> (weak reference to the input, how the block began): for reruns
        self._starts: dict[tuple[int, int], tuple[weakref.ref, _BlockStart]] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = state["_starts"] = None  # per-call data is never copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._starts = {}

    def scope(self) -> CallScope:
        """This thread's CallScope."""
        scope = getattr(self._local, "scope", None)
        if scope is None:
            scope = self._local.scope = CallScope()
        return scope

    def run(self, layer: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Block `layer`'s forward. `x` is [B, N, C] tokens, or a [B, H, W, C] map (SAM) that the
        first block flattens into tokens and dense blocks give back whole."""
        if self.host.checkpoints_in_layers:  # transformers: in the layer's forward, which this one replaces
            checkpoint = layer_checkpointing(self.host.blocks[layer])
            if checkpoint is not None:
                if is_reentrant(checkpoint):
                    raise ValueError(_REENTRANT_CHECKPOINTING)
                return checkpoint(functools.partial(self._run, layer, **kwargs), x, *args)
        return self._run(layer, x, *args, **kwargs)

    def _run(self, layer: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        _refuse_attention_maps(kwargs)
        if x.requires_grad and not torch.is_grad_enabled():  # inside a reentrant checkpoint's forward
            raise ValueError(_REENTRANT_CHECKPOINTING)
        if _in_backward():
            return self._rerun(layer, x)
        scope = self.scope()
        handoff, scope.handoff = scope.handoff, None
        previous, replaced = None, False
        if layer > 0 and handoff is not None and handoff.layer == layer - 1:  # the next block of the call
            call, previous = handoff.call, handoff.call.state
            replaced = x is not handoff.out
            if replaced:
                _check_replacement(layer, x, handoff.out)
                call.state = self._adopt(previous, x)
        else:  # a new call starts here
            call = self._begin(x, self._open(x, args, kwargs, scope), scope)
        if torch.is_grad_enabled() and _in_checkpointed_forward():
            self._remember(layer, x, call, previous, replaced)
        call.state = self._run_block(layer, call, scope)
        if layer == self.last_layer:
            return self._finish(call, scope)
        out = self._block_output(call)
        scope.handoff = _Handoff(call, layer, out)
        return out

    def enter(self, forward: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """Stands in for the host's entry module (the module whose output enters the first block):
        runs it, and keeps what the host reads from its inputs for the first block of this call."""
        out = forward(*args, **kwargs)
        self.scope().entry = (out, self.host.read_entry(args, kwargs))
        return out

    def _open(self, x: Tensor, args: tuple, kwargs: dict, scope: CallScope) -> _Opening:
        """What a new call reads once: the host's masks and memory (every block of a call gets the
        same), the method (none with pruning off) and the call's inputs."""
        entry, scope.entry = scope.entry, None
        entry_inputs = entry[1] if entry is not None and entry[0] is x else None  # not another call's
        block_call = self._with_memory_mask(self.host.read_call(x, args, kwargs, entry_inputs))
        self._follow_input(x)
        method, inputs = _DENSE, {}
        training = self.host.blocks[0].training
        if scope.pruning and x.shape[0] > 0:  # an empty batch has nothing to prune: it runs as the host
            method = self.method
            given = scope.inputs[-1] if scope.inputs else {}
            inputs = check_inputs(method.call_inputs(self.host.spec), given, x.shape[0], str(method))
            if training and not torch.is_grad_enabled() and self._checkpoints_reentrantly():
                raise ValueError(_REENTRANT_CHECKPOINTING)
        return _Opening(block_call, method, inputs, training)

    def _with_memory_mask(self, block_call: BlockCall) -> BlockCall:
        """`block_call`, its memory masked where a tower patched together with this one last
        returned padding: a text tower cross-attending to an image tower that keeps a different
        count per image gets that tower's output rows as its memory, padding included, and a
        caller (transformers' BLIP forward) that passes no mask, or an all-ones one."""
        memory = block_call.memory
        if memory is None or (block_call.memory_mask is not None and not bool(block_call.memory_mask.all())):
            return block_call
        for other in self.together:
            valid = other.scope().output_valid if other is not self else None
            if valid is not None and valid.shape == memory.shape[:2] and not bool(valid.all()):
                return dataclasses.replace(block_call, memory_mask=valid.to(memory.device))
        return block_call

    def _checkpoints_reentrantly(self) -> bool:
        """Whether the model's own loop runs this call's blocks through reentrant checkpointing, which
        records no gradient in them, while the method has parts to train there. (Every block also
        refuses an input that requires grad while none is recorded, which a frozen host never gives.)
        From inside the block a call under torch.no_grad looks the same, so a method with nothing to
        train runs on: reentrant checkpointing then loses only what it loses on the host alone."""
        reads = self.host.checkpoints_reentrantly
        if reads is None or not reads(self.patched):
            return False
        parts = (p for module in (self.parts, self.shared) if module is not None for p in module.parameters())
        return any(p.requires_grad for p in parts)

    def _begin(self, x: Tensor, opening: _Opening, scope: CallScope) -> _Call:
        """The call's first TokenState, and the method's run started on it."""
        block_call, method = opening.block_call, opening.method
        state = TokenState.start(x, self.host.spec.prefix, grid=self.dense or method.uses_grid,
                                 valid=block_call.key_mask, order=block_call.order)
        state.trace.module = self.module
        run = MethodRun(self.host.spec, self.parts, self.shared, opening.training, opening.inputs,
                        state.trace, self.module)
        state = self._step(scope, method.start, state, run)
        return _Call(state, opening, run)

    def _adopt(self, state: TokenState, given: Tensor) -> TokenState:
        """The state taking its tokens' values from `given`, a replacement of what the previous
        block returned (same shape)."""
        return _adopt_dense(state, given) if self.dense else state.replace(x=given)

    def _block_output(self, call: _Call) -> Tensor:
        """What a block before the last returns: its tokens; in dense mode every input position, as
        the last block returns them, so the host's intermediate outputs and forward hooks see the
        whole grid."""
        state = call.state
        if not self.dense:
            return state.x
        if state.source is None:
            # The call keeps the written grid, so a step before the next block (SViT's gate, a
            # reactivation) finds the tokens there and does not write them again.
            call.state = state = state.write_back()
        # Without autograd the grid is written in place again later: the block returns a copy.
        return state.dense_output(copy=not _writes_recorded(state))

    def _remember(self, layer: int, x: Tensor, call: _Call, previous: TokenState | None,
                  replaced: bool) -> None:
        """Keep how block `layer` begins on `x` while `x` lives, for activation checkpointing to run
        it again. What is kept was made before `x` (nothing that holds `x`), so it dies with `x`."""
        state = None
        if previous is not None:  # sparse: the tokens are `x` itself, given again to the rerun
            state = previous.replace(trace=None) if self.dense else previous.replace(x=None, trace=None)
        trace = call.run.trace
        blank = dataclasses.replace(trace, layers=[], keep_decisions=[], reports={}, output_valid=None)
        start = _BlockStart(call.opening, state, replaced, dict(call.run.scratch), blank)
        key = (layer, id(x))
        starts = self._starts
        starts[key] = (weakref.ref(x, lambda _, key=key: starts.pop(key, None)), start)

    def _rerun(self, layer: int, x: Tensor) -> Tensor:
        """Block `layer` run again in the backward pass (activation checkpointing), as the forward
        ran it: from the state it began with, leaving nothing behind (no trace, no collected call)."""
        found = self._starts.get((layer, id(x)))
        if found is None or found[0]() is not x:
            raise ValueError(_UNPLACED_RERUN.format(layer=layer))
        start = found[1]
        scope = CallScope()  # no collectors, no timing
        if start.state is None:
            call = self._begin(x, start.opening, scope)
        else:
            trace = dataclasses.replace(start.trace, layers=[], keep_decisions=[], reports={})
            opening = start.opening
            run = MethodRun(self.host.spec, self.parts, self.shared, opening.training, opening.inputs, trace,
                            self.module, dict(start.scratch))
            state = start.state.replace(trace=trace)
            if start.replaced or not self.dense:
                state = self._adopt(state, x)
            call = _Call(state, opening, run)
        call.state = self._run_block(layer, call, scope)
        if layer == self.last_layer:
            return self._finish(call, scope)
        out = self._block_output(call)
        self._remember(layer + 1, out, call, call.state, False)  # the next block, if checkpointed with it
        return out

    def _run_block(self, layer: int, call: _Call, scope: CallScope) -> TokenState:
        method, run, state = call.opening.method, call.run, call.state
        view = self.host.views[layer]
        record = LayerRecord(layer, 0, 0, state.index, state.valid)
        if state.trace is not None:
            state.trace.layers.append(record)
        state = self._step(scope, method.before_block, layer, state, run)
        block_input = state.x
        record.attention_tokens = state.token_counts()
        own_attention = runs_own_attention(view)
        summary = None  # what a method reads of the attention map, spelled out only for it
        packed_out = heads = None  # [1, T, H*d] the heads' output on the real rows, when run on them alone
        # a ragged batch's token-wise steps (projections, MLP, norms) run on its real rows only
        rows = _real_rows(state, call.opening.block_call)
        if rows is not None and _packs_whole_block(state, method, call.opening.block_call):
            record.mlp_tokens = record.attention_tokens
            record.index, record.valid = state.index, state.valid
            if own_attention:
                record.attention_index, record.attention_valid = state.index, state.valid
                return state.replace(x=self._run_packed_placed(view, state, rows))
            counts = state.valid.sum(dim=1).tolist()
            return state.replace(x=self._run_packed(view, state.x, rows, counts))
        if own_attention:  # windows or relative positions: the view places the tokens
            heads_out, q, k = view.attend(block_input, state, self.eager)  # [B, N, H*d]
            record.attention_index, record.attention_valid = state.index, state.valid
            bias = _attention_bias(state, q.dtype, call.opening.block_call.causal)
        elif (rows is not None and method.reads_attention_summary(layer)
              and _attends_per_sample(state, call.opening.block_call)):
            # a ragged batch: each sample attends over its real rows alone, as its map is read
            q = k = bias = None
            packed_out, summary, heads = self._attend_rows_with_summary(view, block_input, rows, state)
            heads_out = _scatter_rows(packed_out[0], rows, *block_input.shape[:2])
        else:
            q, k, v = _heads_on_rows(view.qkv, block_input, rows)
            bias = _attention_bias(state, q.dtype, call.opening.block_call.causal)
            if state.keep is not None:
                heads_out = ops.policy_attention(q, k, v, state.keep, view.scale, bias)
            elif method.reads_attention_summary(layer):
                queries, dropout = token_queries(state), view.attention_dropout()
                heads_out, summary = ops.attention_and_summary(q, k, v, bias, view.scale, queries, dropout)
            else:
                heads_out = ops.attention(q, k, v, bias, view.scale, view.attention_dropout(), self.eager)
            batch, heads, tokens, dim = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim)
        if packed_out is not None:  # the heads' output is on the real rows already
            x = _attention_rest(view, _gather_rows(block_input, rows), packed_out)[0]
            x = _scatter_rows(x, rows, *block_input.shape[:2])
        else:
            x = _on_rows(functools.partial(_attention_rest, view), rows, block_input, heads_out)
        state = state.replace(x=x)
        attn = AttentionView(q, k, bias, view.scale, state, exact=not own_attention, heads_out=heads_out,
                             summary=summary, heads=heads)
        state = self._step(scope, method.after_attention, layer, state, attn, run)
        # Free the attention's buffers before the MLP allocates its own, as the host's block does:
        # a larger live set makes the allocator return and re-fault pages on every call.
        attn = q = k = v = heads_out = packed_out = summary = x = None
        if state.keep is None:
            block_input = None
        record.mlp_tokens = state.token_counts()
        block_call = call.opening.block_call
        if block_call.memory is not None:
            state = state.replace(x=self._cross_attend(view, state.x, block_call))
            mask = block_call.memory_mask
            record.memory_tokens = block_call.memory.shape[1] if mask is None else mask.sum(dim=1)
        rows = _real_rows(state, block_call)  # the method may have pruned or merged
        x = _on_rows(functools.partial(_mlp_rest, view), rows, state.x)
        if state.keep is not None:  # mask mode: pruned tokens pass through the block unchanged
            keep = state.keep[..., None]
            x = keep * x + (1.0 - keep) * block_input
        record.index, record.valid = state.index, state.valid
        return state.replace(x=x)

    def _run_packed(self, view: BlockView, x: Tensor, rows: Tensor, counts: list[int]) -> Tensor:
        """The block on a ragged batch's real tokens only: `x` [B, N, C] packed into one sequence of
        its `rows`, each sample attending to its own `counts` tokens; returned as [B, N, C] with
        zeros on the padding rows. The padded batch would run every token-wise step (the linear
        layers, norms, the MLP) on each sample's padding too, and attention on the longest count."""
        batch, tokens, _ = x.shape
        x = _gather_rows(x, rows)  # [1, T, C]
        heads_out, _ = self._attend_packed(view, x, counts)
        return _scatter_rows(_block_rest(view, x, heads_out)[0], rows, batch, tokens)

    def _attend_packed(self, view: BlockView, packed: Tensor, counts: list[int],
                       queries: list[Tensor] | None = None) -> tuple[Tensor, list[ops.AttentionSummary]]:
        """Attention over a ragged batch's real tokens `packed` [1, T, C], each sample (`counts`
        tokens in turn) over its own: the heads' output [1, T, H*d]; with `queries` (each sample's
        [n] query weights), the map spelled out and each sample's summary of it."""
        q, k, v = view.qkv(packed)  # [1, H, T, d]
        dropout = view.attention_dropout()
        outputs, summaries = [], []
        samples = zip(q.split(counts, 2), k.split(counts, 2), v.split(counts, 2), strict=True)
        for i, qkv in enumerate(samples):
            if queries is None:
                output = ops.attention(*qkv, None, view.scale, dropout, self.eager)
            else:
                output, summary = ops.attention_and_summary(*qkv, None, view.scale, queries[i][None], dropout)
                summaries.append(summary)
            outputs.append(output[0].transpose(0, 1).flatten(1))  # [n, H*d]
        return torch.cat(outputs)[None], summaries

    def _run_packed_placed(self, view: BlockView, state: TokenState, rows: Tensor) -> Tensor:
        """`_run_packed` for a view that places the tokens itself (windows, relative positions):
        it attends over the real tokens of the ragged batch, and the projection, the MLP and the
        norms here run on its `rows` alone, its attention output never placed in the padded batch."""
        batch, tokens, _ = state.x.shape
        x = _gather_rows(state.x, rows)  # [1, T, C]
        heads_out = view.attend_rows(x[0], rows, state, self.eager)  # [T, H*d]
        return _scatter_rows(_block_rest(view, x, heads_out[None])[0], rows, batch, tokens)

    def _attend_rows_with_summary(self, view: BlockView, x: Tensor, rows: Tensor,
                                  state: TokenState) -> tuple[Tensor, ops.AttentionSummary, int]:
        """Attention spelled out over each sample's real `rows` of `x` [B, N, C] alone, and the
        summary of its maps: the heads' output packed [1, T, H*d], and the summary placed in the
        padded batch (zeros on padding), as the padded batch's masked map would give them; and the
        number of heads."""
        batch, tokens, _ = x.shape
        counts = state.valid.sum(dim=1).tolist()
        queries = token_queries(state).flatten().index_select(0, rows).split(counts)
        heads_out, summaries = self._attend_packed(view, _gather_rows(x, rows), counts, list(queries))
        received = _scatter_rows(torch.cat([part.received[0] for part in summaries]), rows, batch, tokens)
        first_row = torch.cat([part.first_row[0].T for part in summaries])  # [T, H]
        first_row = _scatter_rows(first_row, rows, batch, tokens).transpose(1, 2)
        return heads_out, ops.AttentionSummary(received, first_row), first_row.shape[1]

    def _cross_attend(self, view: BlockView, x: Tensor, call: BlockCall) -> Tensor:
        """The block's attention from its tokens to the call's memory (another modality's tokens)."""
        cross = getattr(view, "cross_attention", None)
        if cross is None:
            raise ValueError("this block has no cross-attention, but the call passes tokens to attend to "
                             "(encoder_hidden_states)")
        q = cross.query(x)
        # the padding of a ragged memory (an image tower's) gets no keys or values
        k, v = _heads_on_rows(cross.key_value, call.memory, _unpadded_rows(call.memory_mask))
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
        state = self._step(scope, call.opening.method.finish, call.state, call.run)
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
        state.trace.output_valid = scope.output_valid = valid
        return out

    def _follow_input(self, x: Tensor) -> None:
        """Keep the method's own parameters on the device and dtype of the activations."""
        for parts in (self.parts, self.shared):
            param = None if parts is None else next(parts.parameters(), None)
            if param is not None and (param.device != x.device or param.dtype != x.dtype):
                parts.to(device=x.device, dtype=x.dtype)


_DENSE = Method()  # does nothing at any layer

_REENTRANT_CHECKPOINTING = (
    "this model checkpoints its blocks with reentrant activation checkpointing, which runs each block "
    "without the token state tokensieve hands from block to block; use non-reentrant checkpointing (timm: "
    "timm.layers.set_reentrant_ckpt(False); transformers: model.activation_checkpointing_enable("
    "activation_checkpointing_kwargs={'use_reentrant': False})), or turn checkpointing off "
    "(timm: model.set_grad_checkpointing(False); transformers: model.activation_checkpointing_disable())")
_UNPLACED_RERUN = (
    "block {layer} runs again in the backward pass (activation checkpointing) on tokens it was not given in "
    "the forward: a checkpoint that makes the blocks' input anew cannot be rerun with the token state; "
    "checkpoint each block (timm: model.set_grad_checkpointing(); transformers: "
    "model.activation_checkpointing_enable()), or the blocks from the first one on, with non-reentrant "
    "checkpointing")


_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _in_checkpointed_forward() -> bool:
    """Whether this block may run again in the backward pass: non-reentrant torch.utils.checkpoint
    (timm's checkpoint and checkpoint_seq, transformers' layers) runs the function it checkpoints
    under saved-tensor hooks, which nothing else of a forward sets (the user's own, such as
    save_on_cpu, only make the Runner keep starts it will not use). The same tier of private API as
    _current_graph_task_id; without it, every block run while a gradient is recorded is taken as one."""
    return _top_saved_tensors_hooks is None or _top_saved_tensors_hooks(False) is not None


def _in_backward() -> bool:
    """Whether this thread runs a backward pass, where activation checkpointing runs blocks again
    (torch.utils.checkpoint reads the same id to tell its reruns apart)."""
    return torch._C._current_graph_task_id() != -1


def _writes_recorded(state: TokenState) -> bool:
    """Whether autograd records writing the state's tokens into its grid, in which case
    tokens.write_tokens writes them into a new tensor, not in place."""
    return torch.is_grad_enabled() and (state.grid.requires_grad or state.x.requires_grad)


def _check_replacement(layer: int, given: Tensor, out: Tensor) -> None:
    if given.shape != out.shape:
        raise ValueError(f"block {layer - 1} returned {tuple(out.shape)} and block {layer} is given "
                         f"{tuple(given.shape)}: a forward hook on a patched block (or the host, between "
                         "blocks) may change the tokens' values, not their shape")


def _adopt_dense(state: TokenState, given: Tensor) -> TokenState:
    """The state taking its values from `given`, every input position in input order (what a dense
    block returns): each token reads its own position (a merged token the position it is kept at;
    a fused token and ragged padding have none and keep theirs), the grid the rest."""
    tokens = given.flatten(1, 2) if state.map_size is not None else given  # [B, N0, C]
    positioned = (state.index >= 0)[..., None]
    x = torch.where(positioned, gather_tokens(tokens, state.index.clamp_min(0)), state.x)
    grid = None if state.grid is None else torch.cat([tokens, state.grid[:, -1:]], dim=1)
    return state.replace(x=x, grid=grid)


def _packs_whole_block(state: TokenState, method: Method, call: BlockCall) -> bool:
    """Whether the whole block can run on a ragged batch's `_real_rows` alone
    (`Runner._run_packed`): its tokens attend by plain key masks (no causal order, merged sizes or
    memory) and its method reads nothing of the block's attention."""
    return not (state.size is not None or call.causal or call.memory is not None
                or type(method).after_attention is not Method.after_attention)


# A ragged batch whose longest sample has fewer tokens attends padded: a text's few tens of tokens
# cost less in one padded product than in a call per sample (madtp_speed.py's text tower).
PER_SAMPLE_MIN_TOKENS = 64


def _attends_per_sample(state: TokenState, call: BlockCall) -> bool:
    """Whether a ragged block's self-attention runs per sample over its real rows: it masks nothing
    but padding keys (no causal order, no merged sizes, no mask mode), and its samples are long."""
    return not (state.size is not None or call.causal or state.keep is not None
                or state.x.shape[1] < PER_SAMPLE_MIN_TOKENS)


def _real_rows(state: TokenState, call: BlockCall) -> Tensor | None:
    """`_unpadded_rows` of a ragged batch, when a block's token-wise steps may skip its padding:
    no mask mode, and no padding of the input (the host's forward computes its rows too, and
    callers may read them)."""
    if state.keep is not None or call.key_mask is not None:
        return None
    return _unpadded_rows(state.valid)


def _unpadded_rows(valid: Tensor | None) -> Tensor | None:
    """The rows [T] of the flattened [B * N] tokens that `valid` marks real, when some are padding
    and no gradient is recorded; otherwise None (every row runs)."""
    if valid is None or torch.is_grad_enabled() or bool(valid.all()):
        return None
    return valid.flatten().nonzero()[:, 0]


def _attention_rest(view: BlockView, x: Tensor, heads_out: Tensor) -> Tensor:
    """The block's output projection, residual add and (post-norm) norm after attention."""
    return _norm_after(view, "attention", _residual(x, view.attention_branch(heads_out)))


def _mlp_rest(view: BlockView, x: Tensor) -> Tensor:
    """The block's MLP, residual add and (post-norm) norm."""
    return _norm_after(view, "mlp", _residual(x, view.mlp_branch(x)))


def _block_rest(view: BlockView, x: Tensor, heads_out: Tensor) -> Tensor:
    """The block after attention, with no step between: `_attention_rest`, then `_mlp_rest`."""
    return _mlp_rest(view, _attention_rest(view, x, heads_out))


def _gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """[B, N, ...] -> [1, T, ...]: the `rows` of the flattened batch."""
    return t.flatten(0, 1).index_select(0, rows)[None]


def _scatter_rows(packed: Tensor, rows: Tensor, batch: int, tokens: int) -> Tensor:
    """[T, ...] -> [B, N, ...]: `packed` at the `rows` of the flattened batch, zeros elsewhere."""
    out = packed.new_zeros(batch * tokens, *packed.shape[1:]).index_copy_(0, rows, packed)
    return out.view(batch, tokens, *packed.shape[1:])


def _on_rows(step: Callable[..., Tensor], rows: Tensor | None, *tensors: Tensor) -> Tensor:
    """`step(*tensors)` (each [B, N, ...]), token-wise; with `rows`, on those rows alone, and zeros
    on the others."""
    if rows is None:
        return step(*tensors)
    batch, tokens = tensors[0].shape[:2]
    return _scatter_rows(step(*(_gather_rows(t, rows) for t in tensors))[0], rows, batch, tokens)


def _heads_on_rows(project: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor,
                   rows: Tensor | None) -> tuple[Tensor, ...]:
    """`project(x)` (heads [B, H, N, d] each: queries, keys, values); with `rows`, computed on those
    rows of `x` alone, zeros elsewhere."""
    if rows is None:
        return project(x)
    batch, tokens, _ = x.shape
    packed = project(_gather_rows(x, rows))  # [1, H, T, d] each
    return tuple(_scatter_rows(t[0].transpose(0, 1), rows, batch, tokens).transpose(1, 2) for t in packed)


def _attention_bias(state: TokenState, dtype: torch.dtype, causal: bool = False) -> Tensor | None:
    """Key mask or additive bias [B, 1, 1, N] ([B, 1, N, N] when causal): padding excluded, causal
    order kept by input position (`state.index`), merged tokens weighted by size."""
    if causal:
        mask = ops.causal_mask(causal_positions(state), state.valid)
    else:
        mask = None if state.valid is None else state.valid[:, None, None, :]
    if state.size is None:
        return mask
    bias = state.size.to(dtype).log()[:, None, None, :]
    return bias if mask is None else bias.masked_fill(~mask, -torch.inf)


def causal_positions(state: TokenState) -> Tensor:
    """[B, N] the input position each token attends from, and is attended at, under a causal mask.
    A fused token (EViT's, MADTP's) mixes tokens from anywhere in its text, so it sits at the text's
    last position: it attends to every token, and only the last token (which has seen the whole
    text; in CLIP the pooled end-of-text token) attends to it. No token reads its own future."""
    fused = state.index < 0  # fused tokens, and ragged padding (which is no key anyway)
    if state.valid is not None:
        fused = fused & state.valid
    if not bool(fused.any()):
        return state.index
    others = ~fused if state.valid is None else state.valid & ~fused  # padding does not end a text
    last = state.index.masked_fill(~others, NO_POSITION).amax(dim=1, keepdim=True)
    return torch.where(fused, last, state.index)


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

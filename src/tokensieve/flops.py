"""Exact multiply-accumulate counts of a (pruned) forward, from its trace.

Counted: every matrix product (patch-embedding convolution, linear layers, the two attention
products, cross-attention to another modality's tokens, and each method's own products). Not
counted: norms, activations, softmax, adds, gathers, embedding lookups. This is what papers quote
as "FLOPs" for ViTs (DeiT-S "4.6 GFLOPs" is 4.6 GMACs) and what
torch.utils.flop_counter.FlopCounterMode counts (it reports FLOPs = 2 x MACs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve.hosts import Host, runs_own_attention
from tokensieve.methods import Method
from tokensieve.modes import in_mode
from tokensieve.patch import is_patched, patch, runner_of, trace, unpatch
from tokensieve.tokens import Trace
from tokensieve.tokens import per_sample as per_sample_counts


@dataclass
class LayerFlops:
    layer: int
    attention_tokens: float  # mean over samples, prefix included
    mlp_tokens: float
    backbone_macs: float  # mean per sample
    overhead: dict[str, float]  # method step -> mean MACs per sample


@dataclass
class FlopsReport:
    """MACs of one forward, per sample (means over the batch). FLOPs = 2 x MACs."""

    macs: float
    backbone_macs: float  # the host's own layers: embedding, blocks, head
    overhead_macs: float  # the method's own work: scorers, predictors, matching
    dense_macs: float  # the same model and input with no pruning
    overhead: dict[str, float]  # method step -> mean MACs per sample
    per_sample: list[float]  # total MACs of each sample
    layers: list[LayerFlops] = field(default_factory=list)
    unit: str = "MACs"

    @property
    def flops(self) -> float:
        return 2.0 * self.macs

    @property
    def ratio(self) -> float:
        """Dense MACs over pruned MACs: the reduction factor."""
        return self.dense_macs / self.macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "macs": self.macs,
            "flops": self.flops,
            "backbone_macs": self.backbone_macs,
            "overhead_macs": self.overhead_macs,
            "dense_macs": self.dense_macs,
            "ratio": self.ratio,
            "overhead": self.overhead,
            "per_sample": self.per_sample,
            "layers": [vars(layer) for layer in self.layers],
        }


def flops(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> FlopsReport:
    """Count the MACs of `model` on `inputs` (a pixel tensor, or keyword inputs for transformers).

    Counts inference: the model runs in eval mode for the call. An unpatched model is counted as
    it is (dense). A batch of no samples is refused with a ValueError: every figure is per sample.
    """
    with in_mode(model, training=False), _patched(model) as host, torch.no_grad(), trace(model) as traces:
        _call(model, inputs)
    return report_from_trace(host, traces[-1])


def tower_flops(model: nn.Module, towers: Sequence[nn.Module],
                inputs: Tensor | Mapping[str, Tensor]) -> list[FlopsReport]:
    """Count the MACs of each of `towers` (modules within `model`) in one forward of `model` on
    `inputs`, one report per tower, per sample of that tower: e.g. BLIP's vision tower and text
    encoder, whose cross-attention costs what the vision tower kept. A tower that is not patched
    is counted dense (patched with no method for the call)."""
    if not towers:
        raise ValueError("give the towers to count: modules within the model")
    with contextlib.ExitStack() as stack:
        stack.enter_context(in_mode(model, training=False))
        stack.enter_context(torch.no_grad())
        hosts = [stack.enter_context(_patched(tower)) for tower in towers]
        traces = [stack.enter_context(trace(tower)) for tower in towers]
        _call(model, inputs)
    missing = [i for i, records in enumerate(traces) if not records]
    if missing:
        raise ValueError(f"the model's forward did not run tower(s) {missing}; give towers within the model")
    return [report_from_trace(host, records[-1]) for host, records in zip(hosts, traces, strict=True)]


def report_from_trace(host: Host, record: Trace) -> FlopsReport:
    """The FlopsReport of one traced forward of a model resolved as `host`."""
    batch = record.batch
    if batch == 0:  # every figure is a mean per sample, and there is none
        raise ValueError("FLOPs are counted per sample, and this batch has no samples; pass at least one")
    patches = record.input_tokens - record.prefix
    fixed = patches * host.embed_macs_per_patch + host.head_macs
    backbone = torch.full((batch,), float(fixed), dtype=torch.float64)
    overhead_total = torch.zeros(batch, dtype=torch.float64)
    overhead: dict[str, float] = {}
    layers = []
    dense = backbone.clone()
    input_counts = record.input_counts().double()  # padding of the input (padded text) excluded
    attention_counts = record.attention_tokens().double()
    mlp_counts = record.kept_tokens().double()
    for layer_record, n_attn, n_mlp in zip(record.layers, attention_counts, mlp_counts, strict=True):
        view = host.views[layer_record.layer]
        n_memory = per_sample_counts(layer_record.memory_tokens, batch, torch.float64)
        attention_macs = None
        if layer_record.attention_index is not None:  # the view ran attention itself: count where it ran
            attention_macs = view.attention_macs(layer_record.attention_index, layer_record.attention_valid,
                                                 record.map_size).cpu()
        block = _block_macs(view, n_attn, n_mlp, n_memory, attention_macs)
        dense += _dense_block_macs(view, record, input_counts, n_memory)
        backbone += block
        layer_overhead = {}
        for name, macs in layer_record.overhead.items():
            per_sample = per_sample_counts(macs, batch, torch.float64)
            overhead_total += per_sample
            layer_overhead[name] = float(per_sample.mean())
            overhead[name] = overhead.get(name, 0.0) + layer_overhead[name]
        layers.append(LayerFlops(layer_record.layer, float(n_attn.mean()), float(n_mlp.mean()),
                                 float(block.mean()), layer_overhead))
    total = backbone + overhead_total
    return FlopsReport(
        macs=float(total.mean()), backbone_macs=float(backbone.mean()),
        overhead_macs=float(overhead_total.mean()), dense_macs=float(dense.mean()), overhead=overhead,
        per_sample=total.tolist(), layers=layers,
    )


def _block_macs(view, attention_tokens: Tensor, mlp_tokens: Tensor, memory_tokens: Tensor,
                attention_macs: Tensor | None = None) -> Tensor:
    """Linear layers on the tokens, plus the attention products: 2 * N^2 * width for global
    attention, or what a view that runs its own attention (windows, relative positions) recorded;
    plus cross-attention to the call's memory, when there is one."""
    width = view.num_heads * view.head_dim
    if attention_macs is None:
        attention_macs = 2 * attention_tokens**2 * width
    macs = (view.attention_linear_macs * attention_tokens
            + attention_macs.to(torch.float64)
            + view.mlp_macs * mlp_tokens)
    cross = getattr(view, "cross_attention", None)
    if cross is not None:  # runs when the call has a memory; queries: the tokens past the method's step
        cross_macs = (cross.query_linear_macs * mlp_tokens + cross.memory_linear_macs * memory_tokens
                      + 2 * mlp_tokens * memory_tokens * cross.num_heads * cross.head_dim)
        macs = macs + cross_macs * (memory_tokens > 0)
    return macs


def _dense_block_macs(view, record: Trace, input_tokens: Tensor, memory_tokens: Tensor) -> Tensor:
    """One block's MACs per sample with every input token active."""
    attention_macs = None
    if runs_own_attention(view):
        index = torch.arange(record.input_tokens)[None]
        attention_macs = view.attention_macs(index, None, record.map_size)[0].cpu()
    return _block_macs(view, input_tokens, input_tokens, memory_tokens, attention_macs)


def _call(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@contextlib.contextmanager
def _patched(model: nn.Module) -> Iterator[Host]:
    """The model's host; a model that is not patched is patched with no method for the call."""
    if is_patched(model):
        yield runner_of(model).host
        return
    sieve = patch(model, Method())
    try:
        yield sieve.runners[0].host
    finally:
        unpatch(model)

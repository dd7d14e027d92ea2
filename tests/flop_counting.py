"""The independent count the FLOPs report is checked against: torch's FlopCounterMode.

torch's counter knows the CUDA attention kernels but not the one SDPA dispatches to on a CPU
(`_scaled_dot_product_flash_attention_for_cpu`), so without a formula for it every SDPA
forward counts its attention as zero. The formula given here is torch's own attention count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_ATTENTION not in flop_registry:  # a later torch may count it itself
    register_flop_formula(_CPU_ATTENTION)(_cpu_attention_flops)


def counted_macs(model: nn.Module, inputs, batch: int) -> float:
    """Per-sample MACs of one no-grad forward, as FlopCounterMode counts them (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return counter.get_total_flops() / 2 / batch

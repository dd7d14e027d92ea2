"""Data parallelism over torch.distributed without a DDP wrapper.

The Sieve is not a submodule of the model, so DistributedDataParallel would not see its
parameters; averaging the gradients of exactly the trained parameters ourselves is simpler.
Without an initialised process group every function is the single-process identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast_parameters(parameters: Sequence[nn.Parameter]) -> None:
    """Start every rank from rank 0's values (their own initialisations may differ)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for param in parameters:
            dist.broadcast(param.data, src=0)


def average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Replace each gradient with its mean over ranks: the gradient of the mean loss over the
    global batch, since every rank holds an equal share of it. One all_reduce for all of them."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for param in parameters:
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone()
        offset += size


def mean_over_ranks(values: Tensor) -> Tensor:
    """Element-wise mean of a small tensor of metrics over ranks."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()

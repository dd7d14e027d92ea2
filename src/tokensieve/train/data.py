"""Batches for each step, in an order fixed by (seed, epoch), so a resumed run sees the same
next batch as one that never stopped; under torch.distributed each rank gets its share.

`data` may be
- a map-style `torch.utils.data.Dataset` of (input, target) samples: fit shuffles it itself from
  (seed, epoch) and cuts global batches of `batch_size`; each rank loads only its share.
  This is the way to exact resume.
- a callable `epoch -> iterable of (inputs, targets) batches`: the caller fixes the order per epoch.
- any other iterable of (inputs, targets) batches (a DataLoader, a list): iterated afresh every
  epoch; resume is exact only if iterating it again gives the same batches (e.g. no shuffle, or
  shuffling with a generator the caller seeds per epoch).
A batch from a callable or iterable is the global batch; each rank keeps its slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate as _default_collate

from tokensieve.train.rng import derived_seed

Batch = Any  # (inputs, targets); inputs a tensor or a dict of keyword arguments of the model


def is_sample_dataset(data: object) -> bool:
    return isinstance(data, Dataset) and hasattr(data, "__len__")


def steps_per_epoch(data: object, batch_size: int) -> int | None:
    """Global batches per epoch, or None when the data does not say (an iterable without len)."""
    if is_sample_dataset(data):
        steps = len(data) // batch_size
        if steps == 0:
            raise ValueError(f"the dataset has {len(data)} samples, fewer than one batch of {batch_size}; "
                             "lower batch_size")
        return steps
    if callable(data) and not isinstance(data, Iterable):
        return None
    return len(data) if hasattr(data, "__len__") else None


def epoch_batches(data: object, epoch: int, skip: int, *, seed: int, batch_size: int, rank: int,
                  world_size: int, num_workers: int = 0,
                  collate_fn: Callable[[list], Batch] | None = None) -> Iterator[Batch]:
    """This rank's share of every global batch of `epoch`, after the first `skip` batches."""
    if is_sample_dataset(data):
        return _dataset_batches(data, epoch, skip, seed=seed, batch_size=batch_size, rank=rank,
                                world_size=world_size, num_workers=num_workers, collate_fn=collate_fn)
    batches = data(epoch) if callable(data) and not isinstance(data, Iterable) else data
    if not isinstance(batches, Iterable):
        raise TypeError(f"fit's data must be a Dataset, an iterable of (inputs, targets) batches, or a "
                        f"function of the epoch returning one; got {type(batches).__name__}")
    return (shard_batch(batch, rank, world_size) for batch in itertools.islice(iter(batches), skip, None))


def _dataset_batches(dataset: Dataset, epoch: int, skip: int, *, seed: int, batch_size: int, rank: int,
                     world_size: int, num_workers: int,
                     collate_fn: Callable[[list], Batch] | None) -> Iterator[Batch]:
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} does not split evenly over {world_size} processes; "
                         f"use a multiple of {world_size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))
    count = len(dataset) // batch_size  # the last, partial batch is dropped: every step sees batch_size
    global_batches = order[: count * batch_size].view(count, batch_size)[skip:]
    share = batch_size // world_size
    rank_batches = global_batches[:, rank * share : (rank + 1) * share].tolist()
    # The loader's own generator seeds its workers, so no draw is taken from the global RNG.
    workers_seed = torch.Generator().manual_seed(derived_seed(seed, epoch, "workers", rank))
    loader = DataLoader(dataset, batch_sampler=rank_batches, num_workers=num_workers,
                        collate_fn=collate_fn or _default_collate, generator=workers_seed)
    return iter(loader)


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's contiguous slice of a global (inputs, targets) batch: tensors and lists are cut
    along their first dimension, tuples and dicts are walked into."""
    if world_size == 1:
        return batch
    inputs, targets = batch
    return _slice(inputs, rank, world_size), _slice(targets, rank, world_size)


def _slice(value: Any, rank: int, world_size: int) -> Any:
    if isinstance(value, Mapping):
        return {key: _slice(item, rank, world_size) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_slice(item, rank, world_size) for item in value)
    if isinstance(value, (Tensor, list)):
        if len(value) % world_size:
            raise ValueError(f"a global batch of {len(value)} does not split evenly over {world_size} "
                             f"processes; use a batch size that is a multiple of {world_size}")
        share = len(value) // world_size
        return value[rank * share : (rank + 1) * share]
    return value  # a scalar or a string: the same for every rank


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value

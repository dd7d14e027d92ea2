"""Seeds and random-number-generator states: what makes a run repeatable and resumable."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of `parts`, e.g. (seed, "epoch", 3) or (seed, "rank", 1).
    Distinct parts give unrelated streams, unlike seed + rank (where run 1 rank 0 = run 0 rank 1)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch (every device), Python's `random` and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng() -> dict[str, Any]:
    """The state of every global generator a training step may draw from (Gumbel noise, dropout,
    a dataset's random augmentation)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """The Python and numpy parts as JSON values (the torch parts are stored as tensors)."""
    version, internal, gauss_next = state["python"]
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
    }


def rng_from_json(values: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss_next = values["python"]
    kind, keys, position, has_gauss, cached_gaussian = values["numpy"]
    return {
        "python": (version, tuple(internal), gauss_next),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian),
    }

"""Fixed seeds and sizes of every task's splits, and the base class of the on-the-fly datasets.

Sample `index` of `split` of `task` is a pure function of
`numpy.random.default_rng((TASK_SEEDS[task], SPLITS[split], index))`, so it is the same bytes on
every run and every machine with the same numpy, and no two splits or tasks share a scene.
Validation is for every choice (checkpoints, thresholds, keep ratios); test only for reported
numbers.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torch.utils.data import Dataset

SPLITS: dict[str, int] = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}
TASK_SEEDS: dict[str, int] = {"cls": 11, "seg": 12, "tos": 13, "nlvr": 14, "retrieval": 15, "det": 16}

# Train splits are epochs of fresh scenes: make them as long as the training budget needs.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "cls": {"train": 100_000, "val": 2_000, "test": 2_000},
    "seg": {"train": 100_000, "val": 1_000, "test": 1_000},
    "tos": {"train": 100_000, "val": 2_000, "test": 2_000},
    "nlvr": {"train": 100_000, "val": 2_000, "test": 2_000},
    "retrieval": {"train": 100_000, "val": 1_000, "test": 1_000},
    "det": {"train": 100_000, "val": 1_000, "test": 1_000},
}


class SyntheticDataset(Dataset):
    """A split of one task, generated on the fly. Subclasses set `task` and write `sample`."""

    task: ClassVar[str]

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive number of samples, got {size}")
        if image_size < 64:
            raise ValueError(f"image_size {image_size} is too small for the scenes; use 64 or more")
        self.split = split
        self.length = DEFAULT_SIZES[self.task][split] if size is None else size
        self.image_size = image_size

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        """The generator that sample (or image) `index` of this split is drawn from."""
        return np.random.default_rng((TASK_SEEDS[self.task], SPLITS[self.split], index))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a {self.task} split of {self.length}")
        return self.sample(int(index))

    def sample(self, index: int) -> dict:
        raise NotImplementedError

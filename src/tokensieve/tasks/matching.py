"""Caption matching: does this caption describe this image? A warm-up for image–text matching.

Built on the retrieval scenes: sample 2k is image k with its own caption (true), sample 2k + 1 is
image k with the caption of another scene of the split (false). Such negatives differ in several
objects, so the question can be answered by finding the named colours and shapes in the image:
the grounding that the nlvr statements need (and that a model trained from scratch on them alone
is slow to find), as BLIP learns image–text matching on captions before NLVR. Samples have the
nlvr keys, so the nlvr model trains on both the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from tokensieve.tasks.language import tokenize
from tokensieve.tasks.retrieval import RetrievalConfig, RetrievalDataset
from tokensieve.tasks.scenes import attribute_map, render
from tokensieve.tasks.splits import SPLITS, TASK_SEEDS

_NEGATIVE_STREAM = 1  # keeps the choice of negatives apart from the scenes' own draws


class MatchingDataset(Dataset):
    """Samples {"image", "text", "tokens", "label" (1: the caption describes the image),
    "attributes" (the image's colour×shape map), "family": "match"}; `size` samples, half of
    them true, from size // 2 + 1 retrieval scenes."""

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: RetrievalConfig | None = None) -> None:
        scenes = None if size is None else max(2, (size + 1) // 2)
        self.scenes = RetrievalDataset(split, scenes, image_size, config)
        self.split = split
        self.length = 2 * len(self.scenes) if size is None else size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a matching split of {self.length}")
        image_index, false = divmod(int(index), 2)
        scene, caption = self.scenes.scene(image_index)
        if false:
            caption = self.scenes.scene(self.negative_of(image_index))[1]
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image), "text": caption.text,
                "tokens": tokenize(caption.text), "label": torch.tensor(1 - false),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)), "family": "match"}

    def negative_of(self, image_index: int) -> int:
        """The scene whose caption is paired with image `image_index` in its false sample."""
        seed = (TASK_SEEDS["retrieval"], SPLITS[self.split], _NEGATIVE_STREAM, image_index)
        rng = np.random.default_rng(seed)
        scenes = len(self.scenes)
        return (image_index + 1 + int(rng.integers(scenes - 1))) % scenes

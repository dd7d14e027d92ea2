"""Batching samples of any task: tensors of equal shape are stacked, word ids padded."""

from __future__ import annotations

import torch

from tokensieve.tasks.language import PAD_ID


def collate(samples: list[dict]) -> dict:
    """One batch dict from sample dicts. "tokens" [T_i] become "tokens" [B, T] padded with PAD_ID
    plus "attention_mask" [B, T] (bool, True on real words); other tensors are stacked; strings
    and ints become lists and int64 tensors."""
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "tokens":
            longest = max(len(v) for v in values)
            tokens = torch.full((len(values), longest), PAD_ID, dtype=torch.long)
            for row, value in enumerate(values):
                tokens[row, : len(value)] = value
            batch["tokens"] = tokens
            batch["attention_mask"] = tokens != PAD_ID
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch

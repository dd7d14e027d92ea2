"""What a run reports: one StepLog per optimiser step, written as a JSONL line by rank 0."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensieve.train.atomic import atomic_write


@dataclass
class StepLog:
    """One optimiser step. Losses and rates are means over the global batch (all ranks); a loss
    term that the step did not compute (weight 0, or no keep decisions) is None."""

    step: int  # optimiser steps done, counting this one (1-based)
    epoch: int  # 0-based epoch the batch came from
    lr: float  # base learning rate of this step (the host's is lr * model_lr_scale)
    loss: float  # weighted sum of the terms below
    loss_task: float
    loss_keep_ratio: float | None
    loss_distill: float | None
    kept_rate: float  # tokens still active after the last block / input tokens (prefix included)
    keep_per_stage: list[float] | None  # mask mode: mean keep decision at each pruning stage
    grad_norm: float  # global gradient norm before clipping
    seconds: float  # wall-clock time of the step, data loading included
    eval: dict[str, float] | None = None  # what fit's `evaluate` returned at this step
    method_losses: dict[str, float] | None = None  # the method's own loss terms (Method.losses), by name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


LOG_FIELDS = tuple(field.name for field in dataclasses.fields(StepLog))


class JsonlLog:
    """Appends one line per step and flushes it, so a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike, resume_after: int | None) -> None:
        """A fresh run truncates the file; a resumed run keeps the lines up to its checkpoint step
        (lines of steps the crashed run did after its last checkpoint are done again)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _lines_up_to(self.path, resume_after) if resume_after is not None else []
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the whole run)

    def write(self, record: StepLog) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _lines_up_to(path: Path, step: int) -> list[str]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            entry: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if entry.get("step", step + 1) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL run log, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""The thresholds of a method on a reference model (SViT's, VLTP's with `by_threshold`), set on
the task's validation split (never the test split, which scores the result)."""

from __future__ import annotations

from torch import nn

from tokensieve.calibration import Calibration, calibrate
from tokensieve.methods import MADTP
from tokensieve.patch import patched_within
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.recipes.batches import task_collate
from tokensieve.tasks import make_dataset
from tokensieve.temperature_calibration import TemperatureCalibration, calibrate_temperature

CALIBRATION_SPLIT = "val"
# validation samples the thresholds are set on, and per forward (det: Mask R-CNN costs more a sample)
CALIBRATION_SAMPLES = {"det": 64}
DEFAULT_CALIBRATION_SAMPLES = 256
CALIBRATION_BATCHES = {"det": 8}
DEFAULT_CALIBRATION_BATCH = 32


def calibrate_reference(model: nn.Module, task: str,
                        macs_budget: float | None = None) -> Calibration | TemperatureCalibration:
    """Set the thresholds of the method patched in `task`'s reference model (patched by
    `patch_reference`) on validation samples: to the method's keep schedule, or so that the
    patched encoder spends `macs_budget` of its dense MACs, gates and decoders included. MADTP's
    temperature is set so that its towers together spend `macs_budget` (which it needs)."""
    count = CALIBRATION_SAMPLES.get(task, DEFAULT_CALIBRATION_SAMPLES)
    batches = calibration_batches(task, CALIBRATION_SPLIT, count)
    if isinstance(patched_within(model)[1].method, MADTP):
        if macs_budget is None:
            raise ValueError("MADTP's temperature is set to a MACs budget: give macs_budget")
        return calibrate_temperature(model, batches, macs_budget=macs_budget)
    return calibrate(model, batches, macs_budget=macs_budget)


def calibration_batches(task: str, split: str, count: int) -> list[dict]:
    """The model inputs of the first `count` samples of `task`'s `split`, in calibration's batches.
    Built once and held: calibration passes over the data once per stage (more with a budget)."""
    size = IMAGE_SIZES[task]
    data = make_dataset(task, split, size=count, image_size=size)
    collate = task_collate(task, size)
    step = CALIBRATION_BATCHES.get(task, DEFAULT_CALIBRATION_BATCH)
    batches = []
    for start in range(0, len(data), step):
        inputs, _ = collate([data[i] for i in range(start, min(start + step, len(data)))])
        inputs.pop("targets", None)  # det: detections in eval mode need no targets
        batches.append(inputs)
    return batches

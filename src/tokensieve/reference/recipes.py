"""How each reference model is trained: the committed recipe that regenerates its shipped weights.

A recipe is a list of phases at growing image sizes (progressive resizing, as in FixRes and
EfficientNetV2): most steps run at 112×112 (or 160×160 for seg, whose masks need finer detail),
where a step costs a quarter (a half) of one at 224×224, and a final phase at the native 224×224
adapts the model to the size it is used at. Each phase is its own
warm-up + cosine run of `tokensieve.train.fit`, starting from the previous phase's weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    image_size: int
    steps: int
    lr: float
    warmup_steps: int


@dataclass(frozen=True)
class Recipe:
    task: str
    phases: tuple[Phase, ...]
    batch_size: int = 64
    weight_decay: float = 0.05
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


RECIPES: dict[str, Recipe] = {
    "cls": Recipe("cls", (Phase(112, 1200, 1e-3, 120), Phase(224, 250, 2.5e-4, 25))),
    "seg": Recipe("seg", (Phase(160, 700, 1e-3, 70), Phase(224, 200, 2.5e-4, 20))),
}

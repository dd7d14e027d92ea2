"""How each reference model is trained: the committed recipe that regenerates its shipped weights.

A recipe is a list of phases at growing image sizes (progressive resizing, as in FixRes and
EfficientNetV2): most steps run at 112×112 (or 160×160 for seg, whose masks need finer detail),
where a step costs a quarter (a half) of one at 224×224, and a final phase at the native 224×224
adapts the model to the size it is used at. Each phase is its own
warm-up + cosine run of `tokensieve.train.fit`, starting from the previous phase's weights.

tos runs 1 600 steps at 128×128 and 150 at its native 256×256. Measured on this 2-core machine
(one thread, other training running alongside; batch 64): 2.0 CPU-seconds per step at 128 px and
10.0 at 256 px, plus 0.23 and 0.72 for generating the batch. Spread over two cores at ~1.7×
(docs/reference.md): ~1.3 s and ~6.3 s per step, so 1 600 × 1.3 + 150 × 6.3 ≈ 3 030 s, ~51 minutes
with validation. A 256 px step costs 5× one at 128 px (4× the tokens; SAM pads the 16×16 grid to
18×18 for its windows, the 8×8 one to 12×12).

nlvr (BLIP) and retrieval (CLIP) run 3 000 steps at 112×112 and 200 at 224×224 (nlvr's first
1 000 on caption matching, whose captions are longer than the statements: not timed yet).
Measured with benchmarks/recipe_timing.py (one thread, other training alongside; batch 64), in CPU-seconds of
training + generating a batch: nlvr 1.11 + 0.21 at 112 px and 4.55 + 0.37 at 224 px; retrieval
1.10 + 0.17 and 4.70 + 0.32. On two cores at ~1.7×: nlvr ~0.78 s and ~2.89 s per step, so
3 000 × 0.78 + 200 × 2.89 ≈ 2 340 + 580 ≈ 2 920 s; retrieval ~0.75 s and ~2.96 s, so
3 000 × 0.75 + 200 × 2.96 ≈ 2 250 + 590 ≈ 2 840 s: ~49 and ~48 minutes, and ~1 more of validation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    image_size: int
    steps: int
    lr: float
    warmup_steps: int
    # What the phase trains on: None, the task's own train split; "matching", caption matching
    # (tokensieve.tasks.matching), the nlvr model's warm-up.
    data: str | None = None

    def __post_init__(self) -> None:
        if self.data not in (None, "matching"):
            raise ValueError(f"Phase(data={self.data!r}): use None (the task's own data) or 'matching'")


@dataclass(frozen=True)
class Recipe:
    task: str
    phases: tuple[Phase, ...]
    batch_size: int = 64
    weight_decay: float = 0.05
    seed: int = 0
    # "seg": the image encoder starts from the shipped seg backbone (reference/transfer.py), as
    # models for these tasks start from a pretrained ViT; None: from scratch.
    start: str | None = None
    # Train with the dense colour×shape loss of reference/auxiliary.py beside the task's own.
    attributes: bool = False

    def __post_init__(self) -> None:
        if self.start not in (None, "seg"):
            raise ValueError(f"Recipe(start={self.start!r}): use 'seg' or None")

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


RECIPES: dict[str, Recipe] = {
    "cls": Recipe("cls", (Phase(112, 1200, 5e-4, 120), Phase(224, 250, 2.5e-4, 25)), start="seg"),
    "seg": Recipe("seg", (Phase(160, 700, 1e-3, 70), Phase(224, 200, 2.5e-4, 20))),
    "tos": Recipe("tos", (Phase(128, 1600, 1e-3, 160), Phase(256, 150, 2.5e-4, 15)), start="seg",
                  attributes=True),
    # BLIP's text encoder is post-norm (BERT): half the lr of the pre-norm models.
    # nlvr first learns caption matching (BLIP's image–text matching on captions), then the statements.
    "nlvr": Recipe("nlvr", (Phase(112, 1000, 5e-4, 100, data="matching"), Phase(112, 2000, 5e-4, 200),
                            Phase(224, 200, 1.25e-4, 20)), start="seg", attributes=True),
    "retrieval": Recipe("retrieval", (Phase(112, 3000, 1e-3, 300), Phase(224, 200, 2.5e-4, 20)),
                        attributes=True),
}

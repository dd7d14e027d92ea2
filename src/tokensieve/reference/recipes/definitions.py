"""How each reference model is trained: the committed recipe that regenerates its shipped weights.

A recipe is a list of phases at growing image sizes (progressive resizing, as in FixRes and
EfficientNetV2): most steps run at 112×112 (or 160×160 for seg, whose masks need finer detail),
where a step costs a quarter (a half) of one at 224×224, and a final phase at the native 224×224
adapts the model to the size it is used at. Each phase is its own
warm-up + cosine run of `tokensieve.train.fit`, starting from the previous phase's weights.

tos runs 1 600 steps at 128×128 and 300 at its native 256×256, each step 32 images with their 4
sentences. Measured with benchmarks/recipe_timing.py (one thread, other training alongside), in
CPU-seconds of training + generating a batch: 1.45 + 0.16 at 128 px and 4.71 + 0.27 at 256 px.
On two cores at ~1.7×: ~0.95 s and ~2.9 s per step, so 1 600 × 0.95 + 300 × 2.9 ≈ 2 390 s, ~41
minutes with validation.

retrieval (CLIP) runs 3 000 steps at 112×112 and 200 at 224×224. Measured before the attribute
head with benchmarks/recipe_timing.py (one thread, other training alongside; batch 64), in CPU-seconds of
training + generating a batch: 1.10 + 0.17 at 112 px and 4.70 + 0.32 at 224 px. On two cores at
~1.7×: ~0.75 s and ~2.96 s per step, so 3 000 × 0.75 + 200 × 2.96 ≈ 2 250 + 590 ≈ 2 840 s, ~48
minutes and ~1 more of validation.

nlvr (BLIP) stays at 224×224, where the small objects its statements name survive, and trains
under bfloat16 autocast: 1 400 steps of 16 training the tower on object readouts and 2 400 on
those and the finding readout (~0.5 s a step on two threads alone, ~1.15 s in fp32), then its
frozen tokens for 28 000 scenes computed once and 6 000 steps of 64 training the text side on
them (~0.19 s a step; docs/reference.md has the measured runs).

det (Mask R-CNN on the ViT) trains at its native 224×224 only: its smallest objects are ~20 px
there, too few pixels at half the side for the stride-4 level to learn from. Batches of 8 images
take ~5.5 s a step in fp32 on two threads once the heads see many proposals (~2.8 s at the
start) and ~3.6 s under bfloat16 autocast, so 800 bf16 steps and four validations of 200 images
(~0.3 s an image) fit in an hour.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokensieve.train.precision import Precision, check_precision


@dataclass(frozen=True)
class Phase:
    image_size: int
    steps: int
    lr: float
    warmup_steps: int
    # What the phase trains on: None, the task's own train split; nlvr's: "captions", BLIP's
    # image–text contrast on the retrieval captions; "matching", caption matching
    # (tokensieve.tasks.matching) with the ITM head; "objects", the vision tower alone learning
    # each object's colour×shape (reference/recipes/nlvr/perception.py); "finding", that and
    # being found by the kinds statements name (perception.FindingReadouts); "tokens", the text
    # side learning the statements over the frozen tower's tokens of `scenes` training scenes
    # (reference/recipes/nlvr/statements.py).
    data: str | None = None
    scenes: int | None = None  # "tokens" phases: how many training scenes' tokens are computed once
    batch_size: int | None = None  # samples a step; None: the recipe's

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise ValueError(f"Phase(data={self.data!r}): use None (the task's own data) or one of "
                             f"{', '.join(repr(kind) for kind in DATA if kind)}")
        if (self.data == "tokens") != (self.scenes is not None):
            raise ValueError("Phase(scenes=...) gives the scenes of a data='tokens' phase, and only of one")


DATA = (None, "captions", "matching", "objects", "finding", "tokens")


@dataclass(frozen=True)
class Recipe:
    task: str
    phases: tuple[Phase, ...]
    batch_size: int = 64  # samples a step; for tos, images (each with all its sentences)
    weight_decay: float = 0.05
    seed: int = 0
    # "seg": the image encoder starts from the shipped seg backbone (reference/transfer.py), as
    # models for these tasks start from a pretrained ViT; None: from scratch.
    start: str | None = None
    # Train with the dense colour×shape loss of reference/recipes/auxiliary.py beside the task's
    # own.
    attributes: bool = False
    # "bf16": every phase's steps (and nlvr's tower tokens) under bfloat16 autocast (TrainConfig).
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.start not in (None, "seg"):
            raise ValueError(f"Recipe(start={self.start!r}): use 'seg' or None")
        check_precision(self.precision, "Recipe")

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)

    def batch_size_of(self, phase: Phase) -> int:
        return phase.batch_size or self.batch_size


RECIPES: dict[str, Recipe] = {
    "cls": Recipe("cls", (Phase(112, 1200, 5e-4, 120), Phase(224, 250, 2.5e-4, 25)), start="seg"),
    "seg": Recipe("seg", (Phase(160, 700, 1e-3, 70), Phase(224, 200, 2.5e-4, 20))),
    # tos batches 32 images, each with its 4 sentences (tasks.TosImages): 128 masks a step
    "tos": Recipe("tos", (Phase(128, 1600, 1e-3, 160), Phase(256, 300, 2.5e-4, 30)), batch_size=32,
                  start="seg", attributes=True),
    # nlvr: the tower learns to tell objects apart in its tokens, then the text side learns the
    # statements over its frozen tokens (reference/recipes/nlvr/: perception.py, statements.py).
    # Perception in batches of 16: 3 000 steps named more shapes than 1 600 of 32 did in about
    # the same time (docs/reference.md). bfloat16 autocast halves a step's time on this machine,
    # which pays for 3 800 perception steps and 6 000 of statements.
    "nlvr": Recipe("nlvr", (Phase(224, 1400, 1e-3, 140, data="objects", batch_size=16),
                            Phase(224, 2400, 5e-4, 240, data="finding", batch_size=16),
                            Phase(224, 6000, 5e-4, 600, data="tokens", scenes=28000)), start="seg",
                   precision="bf16"),
    "retrieval": Recipe("retrieval", (Phase(112, 3000, 1e-3, 300), Phase(224, 200, 2.5e-4, 20)),
                        attributes=True),
    # det: AdamW at 2e-4 with ViTDet's weight decay, the seg backbone fine-tuned with the rest
    "det": Recipe("det", (Phase(224, 800, 2e-4, 50),), batch_size=8, start="seg", precision="bf16"),
}

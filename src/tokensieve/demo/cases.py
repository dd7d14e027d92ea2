"""What the demo runs on each task: the methods the package ships trained for it, the
training-free baselines of its committed comparison (their settings as matched there to the
shipped method's MACs), where the keep maps look, and the papers' claimed operating points."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """A paper's operating point, carried over to our dense model: `macs_share` of its MACs at a
    score `drop` below dense (points of the score, or relative when `relative`)."""

    label: str
    macs_share: float
    drop: float
    relative: bool = False

    def score(self, dense: float) -> float:
        return dense * (1 - self.drop) if self.relative else dense - self.drop


@dataclass(frozen=True)
class Case:
    task: str
    shipped: tuple[str, ...]  # methods shipped trained for the task (`reference.load_method`)
    baselines: tuple[str, ...]  # training-free method specs, scored on the shipped dense model
    blocks: tuple[int, ...]  # the image tower's blocks whose tokens the keep maps show
    results: str  # the committed full comparison (benchmarks/results/), for the curves
    score_key: str  # the score's key in that file's rows
    claims: tuple[Claim, ...] = ()
    text_blocks: tuple[int, ...] = ()  # nlvr, retrieval: the text tower's blocks shown


CASES: dict[str, Case] = {case.task: case for case in (
    Case("seg", ("svit",), ("tome:r=11", "random:keep=0.7,layers=(3,6,9)"), (3, 6, 9, 11),
         "svit_seg.json", "miou",
         (Claim("SViT (COCO, DeiT-S): -0.3 AP at 35% fewer backbone MACs", 0.65, 0.003),)),
    Case("cls", ("dynamicvit", "svit"), ("tome:r=11", "random:keep=0.7,layers=(3,6,9)"), (3, 6, 9, 11),
         "svit_cls.json", "accuracy",
         (Claim("DynamicViT (ImageNet, DeiT-S, keep 0.7): -0.5 points at 0.63 of the MACs", 0.63, 0.005),
          Claim("SViT (ImageNet, DeiT-S): -0.4 points at about 0.65 of the MACs", 0.65, 0.004))),
    Case("tos", ("vltp",), ("random:keep=0.44,layers=(2,)",), (2, 3, 7), "vltp_tos.json", "giou",
         (Claim("VLTP: no loss at -25% encoder MACs", 0.75, 0.0),
          Claim("VLTP: about -1 point at -40%", 0.60, 0.01))),
    Case("nlvr", ("madtp",), ("tome:r=[84,48,27,15,9,5]",), (0, 2, 5), "madtp_nlvr.json", "score",
         (Claim("MADTP (NLVR2, BLIP): -2.8% at -70% GFLOPs", 0.30, 0.028, relative=True),
          Claim("MADTP (NLVR2, BLIP): under -4% at -80% GFLOPs", 0.20, 0.04, relative=True)),
         text_blocks=(0, 1, 3)),
    Case("retrieval", ("madtp",), ("tome:r=[48,36,27,20,16,12]",), (0, 2, 5), "madtp_retrieval.json", "score",
         text_blocks=(0, 1, 3)),
)}

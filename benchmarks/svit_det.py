"""SViT on the det reference model (Mask R-CNN on the ViT), SViT's own setting, against the
baselines at equal backbone MACs, in the layout of the paper's Table 5.

Every trained row is fine-tuned from the shipped det model by `train_method` (what `tokensieve
train det --method M --steps S --precision bf16 --model-lr-scale L` runs) for the same `--steps`
(default 200), in batches of 8 under bfloat16 autocast, the method's parameters at 1e-3 and the
host at 1e-3 · `--model-lr-scale` (default 0.1, the seg benchmark's choice made on its validation
split), Mask R-CNN's five losses as the task loss; runs live under runs/svit-det/ and a finished
one is not trained again. The det model fine-tuned alone by the same recipe is the dense control.
At keep ρ = `--keep` (0.7):

- DynamicViT(keep=ρ): predictors before blocks 3, 6 and 9, its keep-ratio loss; the detector runs
  the ViT dense, so the tokens it drops keep their features in the map ("DynamicViT with preserved
  tokens" in the paper). Its MACs are the budget. DynamicViT(keep=ρ, preserve=False) leaves their
  cells empty, as its authors' pruning discards them; trained likewise.
- EViT(keep=ρ) trained the same way; RandomDrop(keep=ρ, layers=(3, 6, 9)) and ToMe(r) (the r whose
  MACs come closest to the budget) without training.
- SViT(keep=0.7) by its paper's recipe (task and keep-rate losses), its thresholds set on the
  validation split so that the backbone spends the budget, gates included. They are the plain
  thresholds: on det's validation split they score above the dithered ones (`dither=True`), as
  benchmarks/results/svit_det_shipping-val.json records.

Box and mask AP are COCO's over the test split (`--split val` for choices); backbone MACs are the
ViT's per image (gates and predictors included), the mean over the scored images. With `--speed`,
each row's backbone is also timed at batch 1 on the test image of median MACs (`ts.benchmark`:
interleaved, warmed up, medians; fp32, `--threads`): pruning's own speedup against the same patched
backbone with pruning disabled, and the speedup over the host's forward. Never run it beside other
work. Writes benchmarks/results/svit_det.md and .json ("-quick" for other steps or samples,
"-val" for the validation split).

    python benchmarks/svit_det.py --speed                    # train what is missing, score and time it all
    python benchmarks/svit_det.py --trained-only             # score the finished runs, mark the others
    python benchmarks/svit_det.py --samples 50 --steps 10    # a quick look, not for the docs
    python benchmarks/svit_det.py --fill                     # train and score only the rows marked missing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from svit_seg import (
    BASELINE_LAYERS,
    NOT_TRAINED,
    _filled_note,
    _slug,
    _trains,
    add_common_arguments,
    load_patched,
    method_of,
)
from svit_speed import median_image

import tokensieve as ts
from tokensieve.reference import (
    calibrate_reference,
    image_encoder,
    load_reference,
    train_method,
)
from tokensieve.reference.evaluation import evaluate
from tokensieve.tasks import make_dataset
from tokensieve.train import finished_steps, load_trained

TASK = "det"
SVIT_KEEP = 0.7
DEFAULT_STEPS = 200
DEFAULT_HOST_LR_SCALE = 0.1
MACS_BATCH = 16  # images a forward while counting MACs
TOME_RS = range(1, 40)
SPEED_REPEATS, SPEED_WARMUP = 30, 3
NOT_RUN = float("nan")
# The paper's Table 5 (DeiT-S Mask R-CNN with a ViT-Adapter on COCO): change in AP against dense.
PAPER = ("the paper (DeiT-S, COCO): SViT −0.3 box / −0.3 mask AP; EViT, ATS and DynamicViT (preserved) "
         "−1.0 to −1.9")


@dataclass
class Row:
    method: str
    box_ap: float
    mask_ap: float
    box_ap50: float
    mask_ap50: float
    gmacs: float  # backbone MACs per image, 1e9
    macs_share: float  # of dense
    trained_steps: int
    pruning_speedup: float = NOT_RUN  # against the same patched backbone, pruning disabled
    host_speedup: float = NOT_RUN  # against the host's own forward
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--model-lr-scale", type=float, default=DEFAULT_HOST_LR_SCALE,
                        help="the host's learning rate over the method's")
    parser.add_argument("--trained-only", action="store_true",
                        help="leave out the rows whose runs are not finished instead of training them")
    parser.add_argument("--speed", action="store_true", help="also time each row's backbone at batch 1")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--fill", action="store_true",
                        help="train and score only the rows the results file marks not trained, keeping "
                             "the others")
    add_common_arguments(parser, runs=Path("runs/svit-det"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = (args.samples, args.steps, args.model_lr_scale) == (None, DEFAULT_STEPS, DEFAULT_HOST_LR_SCALE)
    path = args.out / f"svit_det{'' if default else '-quick'}{'-val' if args.split == 'val' else ''}"
    command = " ".join(["python benchmarks/svit_det.py", *sys.argv[1:]])
    timing_threads = args.threads
    if args.fill:
        record = json.loads(path.with_suffix(".json").read_text())
        rows = _Bench(args).fill([Row(**row) for row in record["rows"]])
        timing_threads = record.get("timing_threads") or _threads_of(record["command"])  # the rows timed then
        command = f"{record['command']}, then {command} for the rows not trained"
    else:
        rows = _Bench(args).rows()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "timing_threads": timing_threads, "rows": [asdict(r) for r in rows]}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(rows, args, command, timing_threads))
    print(path.with_suffix(".md").read_text())


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = make_dataset(TASK, args.split, size=args.samples)
        images = [self.data[i]["image"] for i in range(len(self.data))]
        self.images = [torch.stack(images[start : start + MACS_BATCH])
                       for start in range(0, len(images), MACS_BATCH)]
        self.dense_macs = 0.0

    def rows(self) -> list[Row]:
        dense = load_reference(TASK).eval()
        self.dense_macs = self._macs(dense)
        rows = [self._row("dense", dense, 0)]
        note = "the host alone, same steps and learning rate"
        rows.append(self._untrained_row(None) or self._row("dense fine-tuned", self._trained(None),
                                                           self.args.steps, note))
        layers = dict(layers=BASELINE_LAYERS)
        dynamicvit = ts.DynamicViT(keep=self.args.keep, **layers)
        if self._untrained_row(dynamicvit) is not None:
            raise SystemExit(f"{dynamicvit} sets the budget: train it first ({self._run_dir(dynamicvit)})")
        budget_model = self._trained(dynamicvit)
        budget = self._macs(budget_model)
        rows.append(self._method_row(dynamicvit, budget_model, "preserved tokens: the budget"))
        discard = ts.DynamicViT(keep=self.args.keep, preserve=False, **layers)
        for method, note in ((discard, "discarded tokens"), (ts.EViT(keep=self.args.keep, **layers), "")):
            rows.append(self._untrained_row(method) or self._method_row(method, self._trained(method), note))
        random_drop = ts.RandomDrop(keep=self.args.keep, **layers)
        note = "frozen in place, untrained"
        rows.append(self._method_row(random_drop, load_patched(random_drop, TASK), note))
        tome = self._tome(budget)
        rows.append(self._method_row(tome, load_patched(tome, TASK), "untrained, r closest to the budget"))
        svit = ts.SViT(keep=SVIT_KEEP)
        if (missing := self._untrained_row(svit)) is not None:
            return [*rows, missing]
        model = self._trained(svit)
        calibrate_reference(model, TASK, macs_budget=budget / self.dense_macs)
        rows.append(self._method_row(svit, model, "thresholds set on validation to the budget"))
        return rows

    def fill(self, rows: list[Row]) -> list[Row]:
        """`rows` (a results file's) with each one marked not trained now trained and scored, the
        others kept; the dense row's MACs stand for dense. SViT's row is calibrated to the
        budget, which takes the full run."""
        self.dense_macs = rows[0].gmacs * 1e9
        filled = list(rows)
        for index, row in enumerate(rows):
            missing = math.isnan(row.box_ap) and row.note.endswith(NOT_TRAINED)
            if not missing or row.method == "dense fine-tuned":
                continue
            method = method_of(row.method)
            if isinstance(method, ts.SViT):
                raise SystemExit(f"{method} is calibrated to the budget: run without --fill")
            note = _filled_note(row.note, self.args.precision)
            filled[index] = self._method_row(method, self._trained(method), note)
        return filled

    def _trained(self, method: ts.Method | None) -> torch.nn.Module:
        run = self._run_dir(method)
        if finished_steps(run) != self.args.steps:
            start = time.perf_counter()
            train_method(TASK, method, run, steps=self.args.steps, precision=self.args.precision,
                         model_lr_scale=self.args.model_lr_scale)
            print(f"trained {method} in {(time.perf_counter() - start) / 60:.1f} minutes", flush=True)
        model = load_patched(method, TASK) if method is not None else load_reference(TASK)
        load_trained(model, run)
        return model.eval()

    def _run_dir(self, method: ts.Method | None) -> Path:
        name = _slug(method) if method is not None else "dense"
        return self.args.runs / f"{name}-steps{self.args.steps}-hostlr{self.args.model_lr_scale:g}"

    def _untrained_row(self, method: ts.Method | None) -> Row | None:
        """With --trained-only, a row that says `method`'s run (None: the dense control's) is not
        finished; None when it is, or when it will be trained."""
        if not self.args.trained_only or finished_steps(self._run_dir(method)) == self.args.steps:
            return None
        name = "dense fine-tuned" if method is None else str(method)
        return Row(name, *(NOT_RUN,) * 6, 0, note=NOT_TRAINED)

    def _tome(self, budget: float) -> ts.ToMe:
        def macs(r: int) -> float:  # the same for every image: one batch counts them
            return ts.flops(image_encoder(load_patched(ts.ToMe(r=r), TASK)), self.images[0][:2]).macs

        return ts.ToMe(r=min(TOME_RS, key=lambda r: abs(macs(r) - budget)))

    def _macs(self, model: torch.nn.Module) -> float:
        encoder = image_encoder(model)
        return sum(ts.flops(encoder, batch).macs * len(batch) for batch in self.images) / len(self.data)

    def _method_row(self, method: ts.Method, model: torch.nn.Module, note: str = "") -> Row:
        return self._row(str(method), model, self.args.steps if _trains(method) else 0, note)

    def _row(self, name: str, model: torch.nn.Module, steps: int, note: str = "") -> Row:
        macs = self._macs(model)
        scores = evaluate(model, TASK, self.data, progress=True)
        row = Row(name, scores["box_ap"], scores["mask_ap"], scores["box_ap50"], scores["mask_ap50"],
                  macs / 1e9, macs / self.dense_macs, steps, note=note)
        if self.args.speed and ts.is_patched(image_encoder(model)):
            encoder = image_encoder(model)
            bench = ts.benchmark(encoder, pixels=median_image(encoder, self.images[0]), repeats=SPEED_REPEATS,
                                 warmup=SPEED_WARMUP, threads=self.args.threads)
            row.pruning_speedup, row.host_speedup = bench.pruning_speedup, bench.speedup
        print(row, flush=True)
        return row


def _threads_of(command: str) -> int:
    """The `--threads` of the first command in a results file's `command` (else the default, 2)."""
    words = command.split(", then ")[0].split()
    return int(words[words.index("--threads") + 1]) if "--threads" in words else 2


def _markdown(rows: list[Row], args: argparse.Namespace, command: str, timing_threads: int) -> str:
    dense = rows[0]
    named = "validation" if args.split == "val" else "test"
    split = f"{named} split" if args.samples is None else f"first {args.samples} {named} samples"

    def speed(value: float) -> str:
        return "—" if math.isnan(value) else f"{value:.2f}×"

    lines = [
        "# SViT on the det reference model (Mask R-CNN on the ViT), against the baselines at equal "
        "backbone MACs",
        "",
        f"Produced by `{command}` ({split}; trained rows fine-tuned {args.steps} steps of 8 images under "
        f"bf16 from the shipped det model, the host at {args.model_lr_scale:g} of the method's learning "
        "rate). COCO box and mask AP; backbone MACs per image (the ViT, gates and predictors included), "
        "mean over the scored images; speedups of the backbone alone at batch 1 (fp32, "
        f"{timing_threads} threads; — where not timed). For comparison, {PAPER}.",
        "",
        "| method | box AP | Δ box | mask AP | Δ mask | box AP50 | mask AP50 | backbone GMACs "
        "| MACs vs dense | pruning's speedup | vs host | steps | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if math.isnan(row.box_ap):
            lines.append(f"| {row.method} | — | — | — | — | — | — | — | — | — | — | — | {row.note} |")
            continue
        lines.append(
            f"| {row.method} | {row.box_ap:.3f} | {100 * (row.box_ap - dense.box_ap):+.1f} "
            f"| {row.mask_ap:.3f} | {100 * (row.mask_ap - dense.mask_ap):+.1f} | {row.box_ap50:.3f} "
            f"| {row.mask_ap50:.3f} | {row.gmacs:.3f} | {row.macs_share:.3f} | {speed(row.pruning_speedup)} "
            f"| {speed(row.host_speedup)} | {row.trained_steps} | {row.note} |")
    lines += ["", "Δ: AP points against the shipped dense model (first row)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

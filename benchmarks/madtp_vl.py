"""MADTP on the two-tower reference models: nlvr (BLIP: vision tower and text encoder) at −50%,
−70% and −80% of both towers' dense MACs, against vision-only pruning, MADTP without alignment
guidance and the authors' batch counts at −70%, and per statement family; retrieval (CLIP: vision
and causal text tower) at −50% and −70%, against vision-only pruning at −50%.

Every trained row starts from the task's shipped model and fine-tunes it with the method on
(`train_method`): the method's parameters at 1e-3, the host at 1e-3 · `--model-lr-scale`, for the
same `--steps` of 32 samples, in fp32 (`--precision`); the task loss plus each method's own
(MADTP's alignment loss, DynamicViT's keep-ratio and distillation losses). Runs live under
runs/madtp-TASK/ and a finished one is not trained again.

- dense, and the dense control: the shipped model fine-tuned alone the same way.
- MADTP at each budget of the task's `budgets` (a share of both towers' dense MACs together, per
  sample): T is set on the validation split (`calibrate_reference`) to the budget before training
  (the untrained bank's) and again on the trained model.
- At the compared budget: EViT, ToMe and DynamicViT on the vision tower, their keep (ToMe: the
  share of tokens merged per block) chosen on the validation split so that both towers spend the
  budget's MACs, fine-tuned the same way; on nlvr also MADTP(aligned=False), importance from the
  two attention terms and no alignment loss, and MADTP(batch_max=True), the authors' counts (each
  image keeps its batch's largest count), both trained and set to the budget the same way.
- nlvr per family (`tasks.nlvr.NLVR_FAMILIES`): dense against MADTP at each budget.

Scores over the split (`--split val` for choices): nlvr accuracy, retrieval R@1 (the split as one
gallery). MACs per sample (an image and its text) of each tower, from the trace of one forward of
the whole model (BLIP's text encoder cross-attends to the image tokens the vision tower kept), the
mean over the first `MACS_SAMPLES` scored samples; MADTP's bank products and merges included.
Everything runs in batches of 32, the size T is set on: the authors' batch counts spend what their
batch makes them spend.
Writes benchmarks/results/madtp_TASK.md, .json and .png ("-quick" for other steps, samples or
learning rates, "-val" for the validation split).

    python benchmarks/madtp_vl.py --task nlvr                       # train what is missing, score it all
    python benchmarks/madtp_vl.py --task nlvr --trained-only        # score the finished runs only
    python benchmarks/madtp_vl.py --task nlvr --only compared       # train and score the comparison only
    python benchmarks/madtp_vl.py --task retrieval --samples 200 --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotting
import torch
from svit_seg import add_common_arguments
from torch.utils.data import Dataset

import tokensieve as ts
from tokensieve.reference import (
    calibrate_reference,
    load_reference,
    method_weights,
    patch_reference,
    store_trained,
    train_method,
)
from tokensieve.reference.calibration import DEFAULT_CALIBRATION_BATCH
from tokensieve.reference.compare import tower_macs
from tokensieve.reference.evaluation import METRICS, evaluate
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.recipes.batches import task_collate
from tokensieve.reference.vl import match_logits
from tokensieve.tasks import make_dataset
from tokensieve.tasks.nlvr import NLVR_FAMILIES
from tokensieve.train import finished_steps, load_trained

DEFAULT_HOST_LR_SCALE = 0.1  # chosen on validation among 0.01, 0.1, 0.5 and 1 (docs/madtp.md)


@dataclass(frozen=True)
class Setup:
    budgets: tuple[float, ...]  # shares of both towers' dense MACs
    allowed_drop: dict[float, float]  # the relative drop allowed at each budget
    compared: float  # the budget the other methods are compared at
    variants: tuple[ts.MADTP, ...]  # MADTP's ablations at the compared budget
    shipped: float  # the budget whose MADTP the package ships (`--ship`)
    steps: int  # of every trained row (retrieval's fewer: CLIP's batches of 32 take longer here)


SETUPS = {
    "nlvr": Setup((0.5, 0.3, 0.2), {0.5: 0.01, 0.3: 0.03, 0.2: 0.04}, 0.3,
                  (ts.MADTP(aligned=False), ts.MADTP(batch_max=True)), shipped=0.3, steps=600),
    "retrieval": Setup((0.5, 0.3), {0.5: 0.02, 0.3: 0.05}, 0.5, (), shipped=0.5, steps=300),
}
EVIT_LAYERS = (0, 2, 4)  # EViT prunes after a block's attention; from the first block, to reach −70%
DYNAMICVIT_LAYERS = (1, 3, 5)  # DynamicViT's predictors before blocks 1, 3 and 5
MATCH_SAMPLES = 64  # validation statements the vision-only methods' settings are matched on
MACS_SAMPLES = 256
# batches as calibration's: MADTP(batch_max=True) spends what its batch size makes it spend
BATCH = DEFAULT_CALIBRATION_BATCH
NOT_RUN = float("nan")
NOT_TRAINED = "not trained yet (--trained-only)"


@dataclass
class Row:
    group: str  # "dense", "budget", "compared"
    method: str
    score: float  # nlvr accuracy, retrieval R@1
    gmacs: float  # both towers per sample, 1e9
    vision_gmacs: float
    text_gmacs: float
    macs_share: float  # of dense
    trained_steps: int
    note: str = ""
    families: dict[str, float] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(SETUPS), required=True)
    parser.add_argument("--steps", type=int, default=None, help="of every trained row (default: the task's)")
    parser.add_argument("--model-lr-scale", type=float, default=DEFAULT_HOST_LR_SCALE,
                        help="the host's learning rate over the method's")
    parser.add_argument("--trained-only", action="store_true",
                        help="mark the rows whose runs are not finished instead of training them")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--fill", action="store_true",
                        help="keep the rows the results file has scored; train and score only the others")
    parser.add_argument("--only", choices=("budgets", "compared"), default=None,
                        help="train and score only MADTP's budget rows (and the dense control), or only the "
                             "comparison at the compared budget")
    parser.add_argument("--ship", action="store_true",
                        help="store MADTP's finished run at the shipped budget (nlvr −70%%, retrieval −50%%) "
                             "as the package's trained method (`load_method(TASK, 'madtp')`)")
    add_common_arguments(parser, runs=None)
    parser.set_defaults(precision="fp32")
    args = parser.parse_args()
    args.runs = args.runs or Path(f"runs/madtp-{args.task}")
    task_steps = SETUPS[args.task].steps
    args.steps = args.steps or task_steps
    torch.set_num_threads(args.threads)
    default = (args.samples, args.steps, args.model_lr_scale) == (None, task_steps, DEFAULT_HOST_LR_SCALE)
    name = f"madtp_{args.task}{'' if default else '-quick'}{'-val' if args.split == 'val' else ''}"
    path = args.out / name
    command = " ".join(["python benchmarks/madtp_vl.py", *sys.argv[1:]])
    results = path.with_suffix(".json")
    earlier = json.loads(results.read_text()) if args.fill and results.is_file() else None
    bench = _Bench(args, earlier)
    rows = bench.rows()
    if args.ship:
        bench.ship()
    if earlier is not None:
        command = f"{earlier['command']}, then {command}"
    args.out.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"command": command, "rows": [asdict(r) for r in rows]},
                                                    indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(rows, args, command))
    _plot(rows, path.with_suffix(".png"), args)
    print(path.with_suffix(".md").read_text())


class _Bench:
    def __init__(self, args: argparse.Namespace, earlier: dict | None = None) -> None:
        self.args = args
        self.task = args.task
        self.setup = SETUPS[args.task]
        size = IMAGE_SIZES[args.task]
        self.data = make_dataset(args.task, args.split, size=args.samples, image_size=size)
        self.match_data = make_dataset(args.task, "val", size=MATCH_SAMPLES, image_size=size)
        rows = [Row(**row) for row in earlier["rows"]] if earlier else []
        self.scored = {(row.group, row.method): row for row in rows if not math.isnan(row.score)}
        self.dense_macs = 0.0

    def rows(self) -> list[Row]:
        dense = load_reference(self.task).eval()
        self.dense_macs = sum(tower_macs(dense, self.task, self.data, MACS_SAMPLES, BATCH).values())
        matched = tower_macs(dense, self.task, self.match_data, MATCH_SAMPLES, BATCH)
        self.dense_match_macs = sum(matched.values())
        rows = [self._row("dense", "dense", dense, 0)]
        setup = self.setup
        if self.args.only != "compared":
            rows.append(self._row("dense", "dense fine-tuned", lambda: self._trained(None), self.args.steps,
                                  "the shipped model fine-tuned alone, same steps and learning rate"))
            for budget in setup.budgets:
                method = ts.MADTP()
                name = f"{method} at {budget:g} of dense MACs"
                rows.append(self._row("budget", name, lambda m=method, b=budget: self._trained(m, b),
                                      self.args.steps, "T set on validation to the budget"))
        if self.args.only != "budgets":
            for method in setup.variants:
                name = f"{method} at {setup.compared:g} of dense MACs"
                rows.append(self._row("compared", name, lambda m=method: self._trained(m, setup.compared),
                                      self.args.steps, "T set on validation to the budget"))
            for method in self._vision_only():
                rows.append(self._row("compared", str(method), lambda m=method: self._trained(m),
                                      self.args.steps,
                                      "vision tower only; its setting matched on validation to the budget"))
        return rows

    def ship(self) -> None:
        """Store the finished MADTP run at the shipped budget in the package (fp16 host, T set on
        the validation split after rounding, as `train_method(..., out_dir=...)` stores a run)."""
        budget = self.setup.shipped
        run = self._run_dir(ts.MADTP(), budget)
        if finished_steps(run) != self.args.steps:
            raise SystemExit(f"--ship: {run} is not finished; train it first")
        model = load_reference(self.task)
        patch_reference(model, ts.MADTP())
        load_trained(model, run)
        print(f"shipped {store_trained(model, self.task, method_weights(self.task, 'madtp'), budget)}")

    def _vision_only(self) -> list[ts.Method]:
        """EViT, ToMe and DynamicViT on the vision tower, each at the setting whose MACs (both towers,
        validation) are closest to the compared budget's."""
        target = self.setup.compared
        keep = _bisect(lambda k: self._share(ts.EViT(keep=k, layers=EVIT_LAYERS)), target)
        evit = ts.EViT(keep=round(keep, 3), layers=EVIT_LAYERS)
        keep = _bisect(lambda k: self._share(ts.DynamicViT(keep=k, layers=DYNAMICVIT_LAYERS)), target)
        dynamicvit = ts.DynamicViT(keep=round(keep, 3), layers=DYNAMICVIT_LAYERS)
        config = load_reference(self.task).config.vision_config
        share = _bisect(lambda f: -self._share(ts.ToMe(r=_tome_schedule(f, config))), -target, high=0.5)
        tome = ts.ToMe(r=_tome_schedule(share, config))
        return [evit, tome, dynamicvit]

    def _share(self, method: ts.Method) -> float:
        """Both towers' MACs with `method` on the vision tower, over dense, on validation samples."""
        model = load_reference(self.task).eval()
        patch_reference(model, method)
        macs = tower_macs(model, self.task, self.match_data, MATCH_SAMPLES, BATCH)
        return sum(macs.values()) / self.dense_match_macs

    def _trained(self, method: ts.Method | None, budget: float | None = None) -> torch.nn.Module:
        """The task's model fine-tuned with `method` (MADTP at `budget`) by the benchmark's recipe;
        MADTP's T set on the validation split to the budget."""
        run = self._run_dir(method, budget)
        if finished_steps(run) != self.args.steps:
            if self.args.trained_only:
                raise _NotTrained
            start = time.perf_counter()
            try:
                train_method(self.task, method, run, steps=self.args.steps, precision=self.args.precision,
                             model_lr_scale=self.args.model_lr_scale, macs_budget=budget, progress=False)
            except ts.BudgetOutOfReach as error:
                raise _OutOfReach(str(error)) from error
            print(f"trained {method} in {(time.perf_counter() - start) / 60:.1f} minutes", flush=True)
        model = load_reference(self.task)
        if method is not None:
            patch_reference(model, method)
        load_trained(model, run)
        model.eval()
        if budget is not None:
            try:
                print(calibrate_reference(model, self.task, budget), flush=True)
            except ts.BudgetOutOfReach as error:
                raise _OutOfReach(str(error)) from error
        return model

    def _run_dir(self, method: ts.Method | None, budget: float | None) -> Path:
        name = "dense" if method is None else _slug(method)
        name += "" if budget is None else f"-budget{budget:g}"
        return self.args.runs / f"{name}-steps{self.args.steps}-hostlr{self.args.model_lr_scale:g}"

    def _row(self, group: str, name: str, model: torch.nn.Module | Callable[[], torch.nn.Module], steps: int,
             note: str = "") -> Row:
        """The row of `model` (or of what the callable makes, made only if the row is not reused)."""
        if (group, name) in self.scored:
            return self.scored[(group, name)]
        if not isinstance(model, torch.nn.Module):
            try:
                model = model()
            except _NotTrained:
                return Row(group, name, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, 0, NOT_TRAINED)
            except _OutOfReach as error:
                note = f"out of reach: {error}"
                return Row(group, name, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, 0, note)
        towers = tower_macs(model, self.task, self.data, MACS_SAMPLES, BATCH)
        by_family = {}
        if self.task == "nlvr":
            correct = _correct(model, self.data)
            score = float(correct.float().mean())
            grouped = defaultdict(list)
            for i in range(len(self.data)):
                grouped[self.data[i]["family"]].append(float(correct[i]))
            by_family = {family: sum(grouped[family]) / len(grouped[family])
                         for family in NLVR_FAMILIES if grouped[family]}
        else:
            scores = evaluate(model, self.task, self.data, batch_size=BATCH, progress=False)
            score = scores[METRICS[self.task]]
        macs = sum(towers.values())
        row = Row(group, name, score, macs / 1e9, towers["vision"] / 1e9, towers["text"] / 1e9,
                  macs / self.dense_macs, steps, note, by_family)
        print(row, flush=True)
        return row


class _NotTrained(Exception):
    """A row's run is not finished and --trained-only asks not to train it."""


class _OutOfReach(Exception):
    """No temperature makes MADTP spend the row's budget on the validation split."""


def _slug(method: ts.Method) -> str:
    text = str(method).lower()
    for old, new in (("(", "-"), (")", ""), ("=", ""), (", ", "-"), ("'", ""), ("[", ""), ("]", "")):
        text = text.replace(old, new)
    return text


def _tome_schedule(share: float, config) -> list[int]:
    """ToMe's tokens merged per block when each block merges `share` (at most half, ToMe's
    bipartite limit) of the patch tokens it is given: a constant r cannot reach −70% in 6 blocks."""
    tokens = (config.image_size // config.patch_size) ** 2
    schedule = []
    for _ in range(config.num_hidden_layers):
        schedule.append(int(share * tokens))
        tokens -= schedule[-1]
    return schedule


def _bisect(share: Callable[[float], float], target: float, steps: int = 14, high: float = 1.0) -> float:
    """The setting in (0, high) whose share (increasing with it) is closest to `target`."""
    low = 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if share(middle) < target else (low, middle)
    return (low + high) / 2


@torch.no_grad()
def _correct(model: torch.nn.Module, data: Dataset) -> torch.Tensor:
    """Whether the nlvr model judges each statement of `data` right, as `evaluate` scores nlvr."""
    collate = task_collate("nlvr", IMAGE_SIZES["nlvr"])
    results = []
    for start in range(0, len(data), BATCH):
        inputs, labels = collate([data[i] for i in range(start, min(start + BATCH, len(data)))])
        logits = match_logits(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        results.append(logits.argmax(-1) == labels)
    return torch.cat(results)


MODELS = {"nlvr": "nlvr reference model (BLIP)", "retrieval": "retrieval reference model (CLIP)"}
SAMPLE = {"nlvr": "statement", "retrieval": "image-caption pair"}
TEXT_TOWER = {"nlvr": "text encoder on its sentence (cross-attending to the image tokens kept)",
              "retrieval": "text tower on its caption"}


def _markdown(rows: list[Row], args: argparse.Namespace, command: str) -> str:
    dense, setup, task = rows[0], SETUPS[args.task], args.task
    named = "validation" if args.split == "val" else "test"
    split = f"{named} split" if args.samples is None else f"first {args.samples} {named} samples"
    metric = METRICS[task]
    lines = [
        f"# MADTP on the {MODELS[task]}, against other pruning at equal MACs of both towers",
        "",
        f"Produced by `{command}` ({split}; trained rows: the shipped model fine-tuned with the method on, "
        f"{args.steps} steps of 32 samples in {args.precision}, the method at 1e-3 and the host at "
        f"{1e-3 * args.model_lr_scale:g}). MACs per {SAMPLE[task]}: the vision tower on its image and the "
        f"{TEXT_TOWER[task]}, the methods' own work included, the mean over the first {MACS_SAMPLES} "
        f"scored samples, in batches of {BATCH} as everything is scored and T set (MADTP's batch count "
        "depends on its batch). `vs dense` is relative; `bar` is the issue's allowed drop at that budget.",
        "",
        f"| group | method | {metric} | vs dense | bar | GMACs (both) | vision | text | MACs vs dense "
        "| steps | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if math.isnan(row.score):
            lines.append(f"| {row.group} | {row.method} | — | — | — | — | — | — | — | — | {row.note} |")
            continue
        relative = row.score / dense.score - 1
        budget = next((b for b in setup.budgets if abs(row.macs_share - b) <= 0.02 * b), None)
        allowed = setup.allowed_drop.get(budget)
        bar = "" if allowed is None or row.group != "budget" else (
            f"≥ −{allowed:.0%}: {'met' if relative >= -allowed else 'not met'}")
        lines.append(f"| {row.group} | {row.method} | {row.score:.4f} | {relative:+.1%} | {bar} | "
                     f"{row.gmacs:.3f} | {row.vision_gmacs:.3f} | {row.text_gmacs:.3f} | "
                     f"{row.macs_share:.3f} | {row.trained_steps} | {row.note} |")
    with_families = [row for row in rows if row.families and row.group in ("dense", "budget")]
    if with_families:
        lines += ["", "## Per statement family (accuracy)", "",
                  "| method | MACs vs dense | " + " | ".join(NLVR_FAMILIES) + " |",
                  "|---|---|" + "---|" * len(NLVR_FAMILIES)]
        for row in with_families:
            cells = " | ".join(f"{row.families.get(family, math.nan):.4f}" for family in NLVR_FAMILIES)
            lines.append(f"| {row.method} | {row.macs_share:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], path: Path, args: argparse.Namespace) -> None:
    pyplot = plotting.pyplot()
    if pyplot is None:
        return
    scored = [row for row in rows if not math.isnan(row.score)]
    figure, axis = pyplot.subplots(figsize=(10.5, 4.6))
    curve = sorted((row for row in scored if row.group == "budget"), key=lambda row: row.gmacs)
    axis.plot([r.gmacs for r in curve], [r.score for r in curve], "o-", label="MADTP (T set to each budget)")
    markers = iter("sv^DPX<>")
    for row in scored:
        if row.group == "compared":
            axis.plot(row.gmacs, row.score, next(markers), label=row.method)
        elif row.group == "dense":
            style = "k*" if row is rows[0] else "k+"
            axis.plot(row.gmacs, row.score, style, markersize=10, label=row.method)
    axis.set_xlabel(f"GMACs per {SAMPLE[args.task]} (vision tower + text tower)")
    axis.set_ylabel(f"{METRICS[args.task]} ({'validation' if args.split == 'val' else 'test'})")
    axis.set_title(f"{args.task}: MADTP against other pruning")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

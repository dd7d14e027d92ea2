"""SViT on the seg reference model against the baselines at equal backbone MACs, and its ablations.

Every trained row is fine-tuned from the shipped seg model by `train_method` (what
`tokensieve train seg --method M --steps S --precision bf16 --model-lr-scale L` runs) for the same
`--steps`, in batches of 32 under bfloat16 autocast, the method's parameters at 1e-3 and the host
at 1e-3 · `--model-lr-scale` (default 0.1: chosen on the validation split, where the seg model
gains from more fine-tuning); runs live under runs/svit-seg/ and a finished one is not trained
again. The seg model fine-tuned alone by the same recipe is the dense control ("dense
fine-tuned"): what any trained row owes to its host's own gain. For each keep ρ of `--keeps`
(default 0.8, 0.7, 0.6) the table scores, on the test split:

- DynamicViT(keep=ρ): its predictors before blocks 3, 6 and 9, fine-tuned by its authors' recipe
  (keep-ratio and self-distillation losses). The seg model runs dense, so the tokens it drops keep
  their features in the map: the paper's "DynamicViT with preserved tokens". Its MACs are the
  budget of the row group. DynamicViT(keep=ρ, preserve=False) leaves their cells empty, as its
  authors' pruning discards them; trained likewise.
- EViT(keep=ρ), fine-tuned the same way; RandomDrop(keep=ρ, layers=(3, 6, 9)), frozen in place,
  untrained; ToMe(r) without training, at the r whose MACs come closest to the budget.
- SViT(keep=0.7), fine-tuned once by its paper's recipe (task and keep-rate losses, no
  distillation), its thresholds set on the validation split so that the backbone spends each
  group's budget (gates included): one set of gates serves every budget.

`--ablations` adds, at ρ = 0.7 and the same budget, SViT without reactivation, without preserved
tokens (their cells of the map zeros before the final norm), at a fixed rate per image (`per_image`, no
thresholds: it keeps the schedule's share of each image), and with DynamicViT's predictor as its
gate, each trained the same steps; SViT's gates trained alone over the frozen shipped model
(`--freeze-host`, the gates shipped without a host); and DynamicViT itself with and without
preserved tokens.

`--determinism` scores SViT(keep=0.7) at that budget twice (its outputs must be equal) under its
two deterministic rules, the dithered thresholds (`dither=True`) and the plain ones
(`dither=False`), and with its authors' test-time practice, Gumbel sampling of the gates
(`sampled=True`, mask mode) under seeds 0, 1 and 2, the same gates. Sampling computes every
token; its row gives the MACs of the tokens it kept (each gated block on its gate's kept tokens),
and two more rows score each rule set to the sampled runs' mean MACs: the practices at the same
compute. Then SViT trained under its plain thresholds (`train_decisions="thresholds"`: training
keeps what inference keeps) is scored with them at the budget and at that same compute.

Backbone MACs are the ViT's (gates and predictors included), per image, the mean over the scored
test images. Writes benchmarks/results/svit_seg.md, .json and, with matplotlib, svit_seg.png
(the budgets), svit_seg_ablations.md and svit_seg_determinism.md (each with its .json) when those
are asked for; a run with other steps or samples writes them with a "-quick" suffix. `--split val`
scores the validation split instead, into files with a "-val" suffix: what choices between
trained variants (which SViT to ship) are made on.

    python benchmarks/svit_seg.py                           # train what is missing, score it all
    python benchmarks/svit_seg.py --keeps --ablations       # the four ablations only
    python benchmarks/svit_seg.py --samples 200 --steps 20  # a quick look, not for the docs
    python benchmarks/svit_seg.py --fill                    # train and score only the rows marked missing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import plotting
import torch

import tokensieve as ts
from tokensieve.loading import METHODS, parse_method
from tokensieve.methods.svit import KEEP_REPORT
from tokensieve.reference import (
    calibrate_reference,
    image_encoder,
    load_reference,
    patch_reference,
    train_method,
)
from tokensieve.reference.evaluation import evaluate
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.tasks import make_dataset
from tokensieve.train import finished_steps, load_trained

TASK = "seg"
BASELINE_LAYERS = (3, 6, 9)  # DynamicViT's and EViT's stages on 12 blocks
ABLATION_KEEP = 0.7
ABLATIONS = {"no reactivation": {"reactivate": False}, "no preserve (discard)": {"preserve": False},
             "fixed rate per image": {"per_image": True},
             "DynamicViT's predictor as gate": {"gate": "dynamicvit"}}
DEFAULT_STEPS = 400
DEFAULT_HOST_LR_SCALE = 0.1
GUMBEL_SEEDS = (0, 1, 2)
DITHER = True  # SViT's rule here, dithered thresholds: chosen on validation (svit_seg_determinism-val.md)
NOT_RUN = float("nan")
NOT_TRAINED = "not trained yet (--trained-only)"  # a row's note when its run is missing
MACS_BATCH = 64  # test images a forward while counting MACs
TOME_RS = range(1, 40)


@dataclass
class Row:
    group: str  # "keep 0.7" or "ablation"
    method: str
    miou: float
    gmacs: float  # backbone MACs per image, 1e9
    macs_share: float  # of dense
    trained_steps: int
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.8, 0.7, 0.6])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--model-lr-scale", type=float, default=DEFAULT_HOST_LR_SCALE,
                        help="the host's learning rate over the method's")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--trained-only", action="store_true",
                        help="leave out the rows whose runs are not finished instead of training them")
    parser.add_argument("--determinism", action="store_true")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="score the test split (reported numbers) or the validation split (choices)")
    add_common_arguments(parser, runs=Path("runs/svit-seg"))
    parser.add_argument("--rewrite", action="store_true",
                        help="remake the markdown and plot of each section from its .json, scoring nothing")
    parser.add_argument("--fill", action="store_true",
                        help="train and score only the rows each asked-for results file marks not trained, "
                             "keeping its other rows as they are")
    args = parser.parse_args()
    if args.rewrite:
        return _rewrite(args)
    torch.set_num_threads(args.threads)
    bench = _Bench(args)
    dense = None if args.fill else bench.dense()
    default = (args.samples, args.steps, args.model_lr_scale) == (None, DEFAULT_STEPS, DEFAULT_HOST_LR_SCALE)
    quick = ("" if default else "-quick") + ("-val" if args.split == "val" else "")
    sections = [("svit_seg", lambda: [row for keep in args.keeps for row in bench.budget(keep)], args.keeps),
                ("svit_seg_ablations", bench.ablations, args.ablations),
                ("svit_seg_determinism", bench.determinism, args.determinism)]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows_of, wanted in sections:
        if not wanted:
            continue
        path = args.out / f"{name}{quick}"
        if args.fill:
            record = bench.fill(json.loads(path.with_suffix(".json").read_text()))
            rows = [Row(**row) for row in record["rows"]]
        else:
            rows = [dense, bench.dense_fine_tuned(), *rows_of()]
            record = {"command": _command(), "rows": [asdict(row) for row in rows]}
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        path.with_suffix(".md").write_text(_markdown(rows, args, name, record["command"]))
        if name == "svit_seg":
            _plot(rows, path.with_suffix(".png"), args.split)
        print(path.with_suffix(".md").read_text())


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        size = IMAGE_SIZES[TASK]
        self.test = make_dataset(TASK, args.split, size=args.samples, image_size=size)
        images = [self.test[i]["image"] for i in range(len(self.test))]
        starts = range(0, len(images), MACS_BATCH)
        self.images = [torch.stack(images[start : start + MACS_BATCH]) for start in starts]
        self.dense_macs = 0.0

    def dense(self) -> Row:
        model = load_reference(TASK)  # the shipped model, unpatched
        self.dense_macs = self._macs(model)
        return Row("dense", "dense", self._score(model), self.dense_macs / 1e9, 1.0, 0)

    def dense_fine_tuned(self) -> Row:
        """The dense control: the seg model fine-tuned alone by the same recipe and steps."""
        model = self._trained(None)
        return Row("dense", "dense fine-tuned", self._score(model), self.dense_macs / 1e9, 1.0,
                   self.args.steps, "the host alone, same steps and learning rate")

    def budget(self, keep: float) -> list[Row]:
        group = f"keep {keep}"
        layers = dict(layers=BASELINE_LAYERS)
        dynamicvit, evit = ts.DynamicViT(keep=keep, **layers), ts.EViT(keep=keep, **layers)
        random_drop = ts.RandomDrop(keep=keep, **layers)
        trained = self._trained(dynamicvit)
        budget = self._macs(trained)
        rows = [self._row(group, dynamicvit, trained)]
        for method in (ts.DynamicViT(keep=keep, preserve=False, **layers), evit):
            rows.append(self._untrained_row(group, method) or self._row(group, method, self._trained(method)))
        rows.append(self._row(group, random_drop, load_patched(random_drop)))
        rows.append(self._row(group, *self._tome(budget)))
        svit = ts.SViT(keep=ABLATION_KEEP, dither=DITHER)
        rows.append(self._row(group, svit, self._calibrated(svit, budget)))
        return rows

    def ablations(self) -> list[Row]:
        budget = self._macs(self._trained(ts.DynamicViT(keep=ABLATION_KEEP, layers=BASELINE_LAYERS)))
        shipped = ts.SViT(keep=ABLATION_KEEP, dither=DITHER)
        rows = [self._row("ablation", shipped, self._calibrated(shipped, budget), note="SViT as shipped")]
        for note, setting in ABLATIONS.items():
            method = ts.SViT(keep=ABLATION_KEEP, dither=DITHER, **setting)
            if (missing := self._untrained_row("ablation", method, f"{note}: ")) is not None:
                rows.append(missing)
                continue
            model = self._trained(method) if setting.get("per_image") else self._calibrated(method, budget)
            rows.append(self._row("ablation", method, model, note=note))
        method = shipped
        note = "the gates alone trained, the host frozen (the shipped seg model)"
        rows.append(self._untrained_row("ablation", method, f"{note}: ", freeze_host=True) or self._row(
            "ablation", method, self._calibrated(method, budget, freeze_host=True), note=note))
        for preserve in (True, False):  # DynamicViT itself on the same schedule (its MACs: the budget)
            method = ts.DynamicViT(keep=ABLATION_KEEP, preserve=preserve, layers=BASELINE_LAYERS)
            note = f"DynamicViT itself, {'preserved' if preserve else 'discarded'} tokens"
            rows.append(self._row("ablation", method, self._trained(method), note=note))
        return rows

    def determinism(self) -> list[Row]:
        budget = self._macs(self._trained(ts.DynamicViT(keep=ABLATION_KEEP, layers=BASELINE_LAYERS)))
        rules = {"dithered thresholds": ts.SViT(keep=ABLATION_KEEP, dither=True),
                 "plain thresholds": ts.SViT(keep=ABLATION_KEEP, dither=False)}
        rows = []
        for rule, method in rules.items():
            model = self._calibrated(method, budget)
            with torch.no_grad():
                same = torch.equal(*(model(self.images[0]) for _ in range(2)))  # the seg model's logits
            rows.append(self._row("determinism", method, model, note=f"{rule}; two runs equal: {same}"))
        sampled = ts.SViT(keep=ABLATION_KEEP, sampled=True)
        gates = ts.sieve_of(image_encoder(model)).state_dict()
        counted = load_reference(TASK)
        patch_reference(counted, sampled)
        overhead = self._macs(counted, "overhead_macs")  # the gates score every token in mask mode
        kept = []
        for seed in GUMBEL_SEEDS:
            patch_reference(model, sampled).load_state_dict(gates)
            torch.manual_seed(seed)
            score = self._score(model)
            torch.manual_seed(seed)
            kept.append(self._kept_macs(model) + overhead)
            rows.append(Row("determinism", str(sampled), score, kept[-1] / 1e9, kept[-1] / self.dense_macs,
                            self.args.steps, f"Gumbel sampling at test time, seed {seed}; MACs: its kept "
                            "tokens' (mask mode computes every token)"))
            print(rows[-1], flush=True)
        same_compute = sum(kept) / len(kept)
        for rule, method in rules.items():
            rows.append(self._row("determinism", method, self._calibrated(method, same_compute),
                                  note=f"{rule} set to the sampled runs' mean MACs"))
        # Trained under its plain thresholds: training sees the subsets inference computes.
        method = ts.SViT(keep=ABLATION_KEEP, train_decisions="thresholds", dither=False)
        if (missing := self._untrained_row("determinism", method)) is not None:
            return [*rows, missing]
        model = self._calibrated(method, budget)
        with torch.no_grad():
            same = torch.equal(*(model(self.images[0]) for _ in range(2)))
        rows.append(self._row("determinism", method, model,
                              note=f"trained under its thresholds; thresholds; two runs equal: {same}"))
        rows.append(self._row("determinism", method, self._calibrated(method, same_compute),
                              note="trained under its thresholds; thresholds set to the sampled runs' "
                                   "mean MACs"))
        return rows

    def fill(self, record: dict) -> dict:
        """`record` (a results file) with each row it marks not trained now trained and scored, its
        other rows kept; the dense row's MACs stand for dense. SViT's rows are calibrated to their
        group's budget, which takes the full run."""
        rows = [Row(**row) for row in record["rows"]]
        self.dense_macs = rows[0].gmacs * 1e9
        filled = []
        for index, row in enumerate(rows):
            if not (math.isnan(row.miou) and row.note.endswith(NOT_TRAINED)):
                continue
            method = method_of(row.method)
            if isinstance(method, ts.SViT):
                raise SystemExit(f"{method} is calibrated to its group's budget: run without --fill")
            note = _filled_note(row.note, self.args.precision)
            rows[index] = self._row(row.group, method, self._trained(method), note)
            filled.append(row.method)
        if filled:
            record["command"] += f", then {_command()} for {', '.join(filled)}"
        return {**record, "rows": [asdict(row) for row in rows]}

    def _untrained_row(self, group: str, method: ts.Method, note: str = "",
                       freeze_host: bool = False) -> Row | None:
        """With --trained-only, a row that says `method`'s run is not trained (None: it is, or
        it will be)."""
        run = self.run_dir(method, freeze_host)
        if not self.args.trained_only or finished_steps(run) == self.args.steps:
            return None
        return Row(group, str(method), NOT_RUN, NOT_RUN, NOT_RUN, 0, f"{note}{NOT_TRAINED}")

    def _kept_macs(self, model: torch.nn.Module) -> float:
        """Backbone MACs per image a sampled SViT's kept tokens alone would spend (each gated block
        run on the tokens its gate kept), gates excluded: the dense MACs less, per block, what its
        dropped tokens would have cost (the linear layers per token, attention's 2·n²·C)."""
        encoder = image_encoder(model)
        width, hidden = encoder.config.hidden_size, encoder.config.intermediate_size

        def block(tokens: torch.Tensor) -> torch.Tensor:
            return (4 * width * width + 2 * width * hidden) * tokens + 2 * tokens.square() * width

        saved = 0.0
        for batch in self.images:
            with torch.no_grad(), ts.trace(encoder) as traces:
                encoder(batch)
            trace = traces[0]
            for gate in trace.reports[KEEP_REPORT]:  # one per gated block, in block order
                tokens = trace.prefix + gate.keep.sum(dim=1).double()
                saved += float((block(torch.tensor(float(trace.input_tokens))) - block(tokens)).sum())
        return self.dense_macs - saved / len(self.test)

    def _trained(self, method: ts.Method | None, freeze_host: bool = False) -> torch.nn.Module:
        """The seg model fine-tuned with `method` (None: alone) for --steps, or only the method's
        parameters trained over the frozen shipped model; trained now if its run is not done."""
        run = self.run_dir(method, freeze_host)
        if finished_steps(run) != self.args.steps:
            start = time.perf_counter()
            train_method(TASK, method, run, steps=self.args.steps, precision=self.args.precision,
                         model_lr_scale=self.args.model_lr_scale, freeze_host=freeze_host)
            print(f"trained {method} in {(time.perf_counter() - start) / 60:.1f} minutes", flush=True)
        model = load_patched(method) if method is not None else load_reference(TASK).eval()
        load_trained(model, run)
        return model.eval()

    def run_dir(self, method: ts.Method | None, freeze_host: bool = False) -> Path:
        name = _slug(method) if method is not None else "dense"
        if freeze_host:
            return self.args.runs / f"{name}-frozenhost-steps{self.args.steps}"
        return self.args.runs / f"{name}-steps{self.args.steps}-hostlr{self.args.model_lr_scale:g}"

    def _calibrated(self, method: ts.SViT, budget: float, freeze_host: bool = False) -> torch.nn.Module:
        """SViT trained, its thresholds set on validation to spend `budget` MACs per image."""
        model = self._trained(method, freeze_host)
        calibrate_reference(model, TASK, macs_budget=budget / self.dense_macs)
        return model

    def _tome(self, budget: float) -> tuple[ts.Method, torch.nn.Module]:
        """ToMe at the r whose MACs come closest to `budget` (ToMe's MACs are the same for every
        image: one batch counts them)."""
        def macs(r: int) -> float:
            return ts.flops(image_encoder(load_patched(ts.ToMe(r=r))), self.images[0][:2]).macs

        best = min(TOME_RS, key=lambda r: abs(macs(r) - budget))
        return ts.ToMe(r=best), load_patched(ts.ToMe(r=best))

    def _macs(self, model: torch.nn.Module, kind: str = "macs") -> float:
        """Backbone MACs per image (or another FlopsReport field) over the scored test images:
        SViT's depend on each image."""
        encoder = image_encoder(model)
        total = sum(getattr(ts.flops(encoder, batch), kind) * len(batch) for batch in self.images)
        return total / len(self.test)

    def _score(self, model: torch.nn.Module) -> float:
        return evaluate(model, TASK, self.test, progress=True)["mIoU"]

    def _row(self, group: str, method: ts.Method, model: torch.nn.Module, note: str = "") -> Row:
        macs = self._macs(model)
        steps = self.args.steps if _trains(method) else 0
        row = Row(group, str(method), self._score(model), macs / 1e9, macs / self.dense_macs, steps, note)
        print(row, flush=True)
        return row


def add_common_arguments(parser: argparse.ArgumentParser, runs: Path) -> None:
    """The options every SViT benchmark takes: the sample count, threads, run and result folders."""
    parser.add_argument("--samples", type=int, default=None, help="first N samples (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=runs)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="of the training steps: bf16 autocast, or fp32 (on a CPU without fast bfloat16, "
                             "AVX2 only, bf16 runs far slower)")


def load_patched(method: ts.Method, task: str = TASK) -> torch.nn.Module:
    """`task`'s shipped reference model patched with `method`, in eval mode."""
    model = load_reference(task)
    patch_reference(model, method)
    return model.eval()


def _filled_note(note: str, precision: str) -> str:
    """A missing row's note once `--fill` trained it: its own part, and the precision if not the
    table's bf16."""
    own = note.removesuffix(NOT_TRAINED).removesuffix(": ")
    return ", ".join(part for part in (own, "" if precision == "bf16" else f"trained in {precision}") if part)


def method_of(text: str) -> ts.Method:
    """A results row's method column back to the method: 'DynamicViT(keep=0.8, preserve=False)'."""
    name, _, arguments = text.partition("(")
    keys = {cls.__name__: key for key, cls in METHODS.items()}
    if name not in keys:
        raise ValueError(f"{text!r} names no method; methods are {', '.join(keys)}")
    return parse_method(f"{keys[name]}:{arguments.removesuffix(')')}")


def _trains(method: ts.Method) -> bool:
    return not isinstance(method, (ts.ToMe, ts.RandomDrop))


def _slug(method: ts.Method) -> str:
    """A run directory's name: "SViT(keep=0.7, reactivate=False)" -> svit-keep0.7-reactivatefalse.
    The method's inference-only settings (SViT's `dither`) are left out: they train nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(method) if f.name in method.inference_fields}
    text = str(dataclasses.replace(method, **defaults)).lower()
    for old, new in (("(", "-"), (")", ""), ("=", ""), (", ", "-"), ("'", "")):
        text = text.replace(old, new)
    return text


TITLES = {"svit_seg": "SViT on the seg reference model, against the baselines at equal backbone MACs",
          "svit_seg_ablations": "SViT on the seg reference model: the paper's four insights as ablations",
          "svit_seg_determinism": "SViT on the seg reference model: its thresholds against test-time Gumbel"}


def _command() -> str:
    """The command line this run was given, for the file's first line."""
    return " ".join(["python benchmarks/svit_seg.py", *sys.argv[1:]])


def _rewrite(args: argparse.Namespace) -> None:
    for path in sorted(args.out.glob("svit_seg*.json")):
        record = json.loads(path.read_text())
        rows = [Row(**row) for row in record["rows"]]
        name = path.stem.removesuffix("-val").removesuffix("-quick")
        args.split = "val" if path.stem.endswith("-val") else "test"
        path.with_suffix(".md").write_text(_markdown(rows, args, name,
                                                     record["command"]))
        if name == "svit_seg":
            _plot(rows, path.with_suffix(".png"), args.split)
        print(f"rewrote {path.with_suffix('.md')}")


def _markdown(rows: list[Row], args: argparse.Namespace, name: str, command: str) -> str:
    dense = rows[0]
    named = "validation" if args.split == "val" else "test"
    split = f"{named} split" if args.samples is None else f"first {args.samples} {named} samples"
    lines = [
        f"# {TITLES[name]}",
        "",
        f"Produced by `{command}` ({split}; trained rows fine-tuned "
        f"{args.steps} steps of 32 images under bf16 from the shipped seg model, the host at "
        f"{args.model_lr_scale:g} of the method's learning rate; SViT's thresholds set on "
        "the validation split to the group's budget, DynamicViT's MACs at the same keep). mIoU over the six "
        "shape classes; backbone MACs per image, gates and predictors included, mean over the scored test "
        "images.",
        "",
        "| group | method | mIoU | vs dense (points) | backbone GMACs | MACs vs dense | steps | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if math.isnan(row.miou):
            lines.append(f"| {row.group} | {row.method} | — | — | — | — | — | {row.note} |")
            continue
        points = 100 * (row.miou - dense.miou)
        lines.append(f"| {row.group} | {row.method} | {row.miou:.4f} | {points:+.2f} | {row.gmacs:.3f} | "
                     f"{row.macs_share:.3f} | {row.trained_steps} | {row.note} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], path: Path, split: str) -> None:
    pyplot = plotting.pyplot()
    if pyplot is None:
        return
    curves: dict[str, list[Row]] = {}
    for row in rows:
        if row.group.startswith("keep") and not math.isnan(row.miou):  # not the rows not trained
            name = row.method.split("(")[0] + (" (discard)" if "preserve=False" in row.method else "")
            curves.setdefault(name, []).append(row)
    floor = rows[0].miou - 0.12  # a method scoring far below is named, not drawn, so the others stay legible
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        points.sort(key=lambda row: row.gmacs)
        best = max(p.miou for p in points)
        if best < floor:
            label = f"{name}: at most {best:.3f}, below the chart"
            axes.plot([], [], marker="x", linestyle="none", label=label)
            continue
        axes.plot([p.gmacs for p in points], [p.miou for p in points], marker="o", label=name)
    for row, marker in zip(rows[:2], ("*", "P"), strict=True):  # dense, and dense fine-tuned alike
        axes.scatter([row.gmacs], [row.miou], marker=marker, s=120, color="black", label=row.method)
    axes.set_ylim(bottom=floor)
    axes.set_xlabel("backbone GMACs per image")
    axes.set_ylabel(f"{'validation' if split == 'val' else 'test'} mIoU")
    axes.set_title("seg: SViT and the baselines")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

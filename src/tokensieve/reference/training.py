"""Train a reference model from its recipe with `tokensieve.train.fit`, and ship it in fp16."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from torch.utils.data import Dataset

from tokensieve.methods import Method
from tokensieve.reference.evaluation import evaluate
from tokensieve.reference.models import IMAGE_SIZE, IMAGE_SIZES, build_classifier, build_segmenter
from tokensieve.reference.patching import patch_reference
from tokensieve.reference.recipes import RECIPES, Phase, Recipe
from tokensieve.reference.recipes.auxiliary import AttributeHead, with_attributes
from tokensieve.reference.recipes.nlvr.perception import (
    FindingReadouts,
    NlvrObjects,
    ObjectReadouts,
    readout_accuracy,
    readout_loss,
    readouts_collate,
)
from tokensieve.reference.recipes.nlvr.statements import (
    NlvrGrounded,
    StatementReader,
    TowerTokens,
    seed_grounding,
    statements_collate,
    statements_loss,
)
from tokensieve.reference.store import load_reference, save_reference
from tokensieve.reference.tos import build_tos
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import (
    build_nlvr,
    build_retrieval,
    contrastive_logits,
    itc_logits,
    itm_logits,
    text_inputs,
)
from tokensieve.tasks import collate as collate_samples
from tokensieve.tasks import make_dataset
from tokensieve.tasks.matching import MatchingDataset
from tokensieve.tasks.tos import TosConfig, TosImages
from tokensieve.train import (
    TrainConfig,
    contrastive_loss,
    cross_entropy,
    fit,
    latest_checkpoint,
    load_trained,
    logits_of,
    mask_bce_dice,
    pixel_cross_entropy,
)
from tokensieve.train.checkpoint import read_metadata
from tokensieve.train.precision import Precision

VALIDATION_SAMPLES = 500  # a validation subset scored at the end of each phase, in the run's log
READOUT_VALIDATION_SCENES = 128  # the scenes an "objects" or "finding" phase's readouts are scored on
VL_TASKS = ("nlvr", "retrieval")


def build_model(task: str) -> nn.Module:
    """A fresh, untrained reference model of `task` (tos with its default, trained text encoder)."""
    if task == "cls":
        return build_classifier()
    if task == "seg":
        return build_segmenter()
    if task == "tos":
        return build_tos()
    if task == "nlvr":
        return build_nlvr()
    if task == "retrieval":
        return build_retrieval()
    raise ValueError(f"no reference model for task {task!r}; choose cls, seg, tos, nlvr or retrieval")


def train_reference(task: str, run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    recipe: Recipe | None = None, progress: bool = True,
                    model: nn.Module | None = None) -> nn.Module:
    """Train `task`'s reference model by `recipe` (default: RECIPES[task]), one fit per
    phase with checkpoints and JSONL logs under `run_dir` (run again to resume), and write the
    fp16 weights to `out_dir` if given. Returns the trained fp32 model, in eval mode.

    `model` replaces the default fresh model, e.g. `build_tos("minilm")` for tos guided by the
    pretrained MiniLM; the recipe's seed then does not reach its initialisation. Recipes that
    start from the seg backbone load it into either."""
    recipe = recipe or RECIPES[task]
    run_dir = Path(run_dir)
    torch.manual_seed(recipe.seed)
    model = model if model is not None else build_model(task)
    if recipe.start == "seg":
        start_from_seg(model)  # a resumed run then loads its checkpoint over these weights
    # the model with its attribute head (dropped when shipped), kept from phase to phase
    with_head = AttributeHead(model) if recipe.attributes else model
    previous: tuple[nn.Module, Path] | None = None
    for number, phase in enumerate(recipe.phases):
        phase_dir = run_dir / f"phase-{number}-{phase.image_size}px"
        trained = _phase_module(model, phase, with_head)
        fresh = latest_checkpoint(phase_dir) is None
        if previous is not None and type(previous[0]) is type(trained) and fresh:
            load_trained(trained, previous[1])  # a new phase starts from the last one's weights
        # (a phase with another wrapper shares `model`, which the last phase's fit left trained)
        config = _phase_config(recipe, phase, number, phase_dir, progress)
        batch_size = recipe.batch_size_of(phase)
        if phase.data in ("objects", "finding"):
            scenes = NlvrObjects("train", size=phase.steps * batch_size, image_size=phase.image_size,
                                 patch=model.config.vision_config.patch_size)
            fit(trained, scenes, readout_loss, config, collate_fn=readouts_collate,
                evaluate=_readout_validation, logits_of=_whole_output)
        elif phase.data == "tokens":
            statements = NlvrGrounded("train", size=phase.scenes, image_size=phase.image_size,
                                      patch=model.config.vision_config.patch_size)
            data = TowerTokens(statements, model.vision_model, progress=progress, precision=recipe.precision)
            if previous is not None and isinstance(previous[0], FindingReadouts) and fresh:
                seed_grounding(trained, previous[0])  # a fresh reader's grounded heads start from its keys
            with _frozen(model.vision_model):
                fit(trained, data, statements_loss, config, collate_fn=statements_collate,
                    evaluate=_validation(task, phase.image_size), logits_of=_whole_output)
        else:
            data = _phase_data(task, phase, phase.steps * batch_size)
            loss, read, collate = phase_objective(task, phase, recipe.attributes)
            fit(trained, data, loss, config, collate_fn=collate,
                evaluate=_validation(task, phase.image_size), logits_of=read)
        previous = trained, phase_dir
    model.eval()
    if out_dir is not None:
        save_reference(model, out_dir)
    return model


def _phase_module(model: nn.Module, phase: Phase, with_head: nn.Module) -> nn.Module:
    """What a phase's fit trains: the vision tower with its object readouts ("objects"; and
    the finding readout, "finding"), the
    text side over given image tokens ("tokens"), else the model (with its attribute head if
    the recipe has one)."""
    if phase.data in ("objects", "finding", "tokens"):
        if not isinstance(model, transformers.BlipForImageTextRetrieval):
            raise ValueError(f"{phase.data!r} phases train the nlvr model (BLIP), not {type(model).__name__}")
        native = model.config.vision_config.image_size
        if phase.image_size != native:
            raise ValueError(f"{phase.data!r} phases run the tower at its native size: Phase({native}, ...), "
                             f"not {phase.image_size}")
    if phase.data == "objects":
        return ObjectReadouts(model.vision_model)
    if phase.data == "finding":
        return finding_readouts(model)
    if phase.data == "tokens":
        return StatementReader(model)
    return with_head


def finding_readouts(model: transformers.BlipForImageTextRetrieval) -> FindingReadouts:
    """The nlvr tower with its finding readout, whose keys are as wide as a head of the text
    encoder's cross-attention: the statements phase starts its grounded heads from them."""
    text = model.config.text_config
    return FindingReadouts(model.vision_model, key_width=text.hidden_size // text.num_attention_heads)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters without gradient inside the block (fit trains what has one)."""
    wanted = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), wanted, strict=True):
            param.requires_grad_(flag)


def load_recipe_phase(model: nn.Module, phase_dir: str | os.PathLike) -> nn.Module:
    """Load the latest checkpoint of a recipe phase (`runs/TASK/phase-…`) into `model`, a fresh
    reference model of the task, whether the phase trained it alone or wrapped for training
    (AttributeHead, ObjectReadouts, FindingReadouts, StatementReader; the wrapper is then
    dropped). For looking at a run before it ships; returns `model`."""
    checkpoint = latest_checkpoint(phase_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {phase_dir}")
    host = json.loads(read_metadata(checkpoint)["host"])["class"]
    wrappers: dict[type, Callable[[nn.Module], nn.Module]] = {
        AttributeHead: AttributeHead, StatementReader: StatementReader,
        ObjectReadouts: lambda blip: ObjectReadouts(blip.vision_model),
        FindingReadouts: finding_readouts}
    wrap = next((make for kind, make in wrappers.items() if host == f"{kind.__module__}.{kind.__qualname__}"),
                None)
    load_trained(wrap(model) if wrap else model, phase_dir)
    return model


def phase_objective(task: str, phase: Phase, attributes: bool) -> tuple[Callable, Callable, Callable]:
    """What one recipe phase trains with: (loss, which part of the output it reads, the batcher).
    A "captions" phase is BLIP's image–text contrastive warm-up; with `attributes`, the model is
    wrapped in AttributeHead and the attribute loss joins the phase's own."""
    if phase.data == "captions":
        loss, read, collate = contrastive_loss, itc_logits, _itc_collate(phase.image_size)
    else:
        loss, read = _task_loss(task), _logits_of(task)
        collate = _collate(task, phase.image_size, images=task == "tos")
    if attributes:
        return with_attributes(loss, read), _whole_output, _with_attribute_maps(collate)
    return loss, read, collate


def _phase_data(task: str, phase: Phase, size: int) -> Dataset:
    """`size` samples of the phase's training data; for tos, `size` images, each with all its
    sentences (TosImages)."""
    if phase.data in ("matching", "captions") and task != "nlvr":
        raise ValueError(f"{phase.data!r} phases warm up the nlvr model, not the {task} model")
    if task == "tos":
        sentences = size * TosConfig().queries_per_image
        return TosImages(make_dataset(task, "train", size=sentences, image_size=phase.image_size))
    if phase.data == "matching":
        return MatchingDataset("train", size=size, image_size=phase.image_size)
    if phase.data == "captions":
        return make_dataset("retrieval", "train", size=size, image_size=phase.image_size)
    return make_dataset(task, "train", size=size, image_size=phase.image_size)


def _phase_config(recipe: Recipe, phase: Phase, number: int, phase_dir: Path, progress: bool) -> TrainConfig:
    return TrainConfig(
        train="model", steps=phase.steps, batch_size=recipe.batch_size_of(phase), lr=phase.lr,
        warmup_steps=phase.warmup_steps, weight_decay=recipe.weight_decay, seed=recipe.seed + number,
        num_workers=1, checkpoint_dir=str(phase_dir), checkpoint_every=max(100, phase.steps // 30),
        keep_checkpoints=1, eval_every=max(250, phase.steps // 10), log_path=str(phase_dir / "log.jsonl"),
        progress=progress, precision=recipe.precision,
    )


def _task_loss(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    return {"cls": cross_entropy, "seg": pixel_cross_entropy, "tos": mask_bce_dice, "nlvr": cross_entropy,
            "retrieval": contrastive_loss}[task]


def _logits_of(task: str) -> Callable[[object], Tensor]:
    """Which tensor of the model's output the task loss reads."""
    return {"nlvr": itm_logits, "retrieval": contrastive_logits}.get(task, logits_of)


def _whole_output(output: object) -> object:
    return output


def _collate(task: str, image_size: int, images: bool = False) -> Callable[[list[dict]], tuple]:
    """Keyword inputs and the task's targets of a batch; with `images`, the samples are TosImages
    items, each image with all its sentences."""
    if images:
        return _tos_images_collate
    if task in VL_TASKS:
        return _vl_collate(task, image_size)
    return _image_collate(task, image_size)


def _with_attribute_maps(collate: Callable[[list[dict]], tuple]) -> Callable[[list[dict]], tuple]:
    """`collate` with targets {"task": its targets, "attributes": the samples' colour×shape maps}."""

    def with_attribute_maps(samples: list[dict]) -> tuple[dict, dict]:
        inputs, targets = collate(samples)
        return inputs, {"task": targets, "attributes": torch.stack([s["attributes"] for s in samples])}

    return with_attribute_maps


def _itc_collate(image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    """Retrieval captions for BLIP's contrastive head: the retrieval batch, run with
    `use_itm_head=False` (image i matches caption i)."""
    retrieval = _vl_collate("retrieval", image_size)

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        inputs, targets = retrieval(samples)
        return {**inputs, "use_itm_head": False}, targets

    return collate


def _image_collate(task: str, image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    target = "label" if task == "cls" else "mask"

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        inputs = {"pixel_values": torch.stack([s["image"] for s in samples])}
        if task == "cls" and image_size != IMAGE_SIZE:
            inputs["interpolate_pos_encoding"] = True
        if task == "tos":
            inputs["text"] = [s["text"] for s in samples]
        return inputs, torch.stack([torch.as_tensor(s[target]) for s in samples])

    return collate


def _tos_images_collate(items: list[dict]) -> tuple[dict, Tensor]:
    """Images once, every sentence of each with `image_of` naming its image; the targets are the
    sentences' masks [T, H, W]."""
    counts = torch.tensor([len(item["texts"]) for item in items])
    inputs = {"pixel_values": torch.stack([item["image"] for item in items]),
              "text": [text for item in items for text in item["texts"]],
              "image_of": torch.arange(len(items)).repeat_interleave(counts)}
    return inputs, torch.cat([item["masks"] for item in items])


def _vl_collate(task: str, image_size: int) -> Callable[[list[dict]], tuple[dict, Tensor]]:
    """Keyword inputs of BLIP and CLIP (images, the models' text ids and mask) and the targets: the
    labels for nlvr; for retrieval, image i's caption is text i of the batch."""

    def collate(samples: list[dict]) -> tuple[dict, Tensor]:
        batch = collate_samples(samples)
        input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
        inputs = {"pixel_values": batch["image"], "input_ids": input_ids, "attention_mask": attention_mask,
                  "interpolate_pos_encoding": image_size != IMAGE_SIZES[task]}
        targets = batch["label"] if task == "nlvr" else torch.arange(len(samples))
        return inputs, targets

    return collate


def _readout_validation(readouts: ObjectReadouts) -> dict[str, float]:
    data = NlvrObjects("val", size=READOUT_VALIDATION_SCENES, image_size=IMAGE_SIZES["nlvr"],
                       patch=readouts.tower.config.patch_size)
    return readout_accuracy(readouts, [data[i] for i in range(len(data))])


def _validation(task: str, image_size: int) -> Callable[[nn.Module], dict[str, float]]:
    def score(model: nn.Module) -> dict[str, float]:
        if isinstance(model, (AttributeHead, StatementReader)):
            model = model.model
        data = make_dataset(task, "val", size=VALIDATION_SAMPLES, image_size=image_size)
        return evaluate(model, task, data, progress=False)

    return score


def train_method(task: str, method: Method, run_dir: str | os.PathLike, steps: int = 400,
                 batch_size: int = 32, lr: float = 1e-3, model_lr_scale: float = 0.01,
                 precision: Precision = "fp32", progress: bool = True) -> nn.Module:
    """Fine-tune `task`'s shipped reference model with `method` on, DynamicViT-style: the method's
    parameters at `lr`, the host at lr · model_lr_scale (a hundredth: the host is already
    trained, and the method's predictors start random), task + keep-ratio + self-distillation
    losses, at the native size (224×224; tos 256×256), each step in `precision` ("bf16":
    bfloat16 autocast, see TrainConfig). Checkpoints and the JSONL log go to
    `run_dir` (run again to resume). Returns the patched model in eval mode; load the run later
    with `load_trained`."""
    model = load_reference(task)
    patch_reference(model, method)
    size = IMAGE_SIZES[task]
    config = TrainConfig(
        train="model", steps=steps, batch_size=batch_size, lr=lr, model_lr_scale=model_lr_scale,
        warmup_steps=max(1, steps // 20), num_workers=1, checkpoint_dir=os.fspath(run_dir),
        checkpoint_every=50, keep_checkpoints=1, log_path=os.fspath(Path(run_dir) / "log.jsonl"),
        precision=precision, progress=progress,
    )
    data = make_dataset(task, "train", size=steps * batch_size, image_size=size)
    fit(model, data, _task_loss(task), config, collate_fn=_collate(task, size),
        evaluate=_validation(task, size), logits_of=_logits_of(task))
    return model.eval()

"""Train a reference model from its recipe with `tokensieve.train.fit`, and ship it in fp16; or
fine-tune a shipped one with a pruning method. What each phase trains with lives in
reference/recipes/ (training only): the phases of most recipes in phases.py and batches.py, the
nlvr recipe's own in nlvr/."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from tokensieve.methods import MADTP, VLTP, Method, SViT
from tokensieve.methods.vltp import TARGET
from tokensieve.patch import call_input_names, sieve_of
from tokensieve.reference.calibration import calibrate_reference, calibration_batches
from tokensieve.reference.detection import build_detector
from tokensieve.reference.guidance import build_guidance
from tokensieve.reference.models import IMAGE_SIZES, build_classifier, build_segmenter
from tokensieve.reference.patching import image_encoder, patch_reference
from tokensieve.reference.recipes import RECIPES, Phase, Recipe
from tokensieve.reference.recipes.auxiliary import AttributeHead
from tokensieve.reference.recipes.batches import task_collate
from tokensieve.reference.recipes.nlvr import phases as nlvr_phases
from tokensieve.reference.recipes.phases import (
    phase_data,
    phase_objective,
    task_logits,
    task_loss,
    validation,
)
from tokensieve.reference.shipped_methods import save_method
from tokensieve.reference.store import load_reference, save_reference
from tokensieve.reference.tos import TosModel, build_tos
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import build_nlvr, build_retrieval
from tokensieve.tasks import make_dataset
from tokensieve.temperature_calibration import calibrate_temperature
from tokensieve.train import TrainConfig, finished_steps, fit, latest_checkpoint, load_trained
from tokensieve.train.checkpoint import read_metadata
from tokensieve.train.precision import Precision


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
    if task == "det":
        return build_detector()
    raise ValueError(f"no reference model for task {task!r}; choose cls, seg, tos, nlvr, retrieval or det")


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
        if phase.data in nlvr_phases.PHASES:
            start = previous[0] if previous is not None and fresh else None
            nlvr_phases.fit_phase(model, trained, phase, config, start, validation(task, phase.image_size))
        else:
            data = phase_data(task, phase, phase.steps * config.batch_size)
            loss, read, collate = phase_objective(task, phase, recipe.attributes)
            fit(trained, data, loss, config, collate_fn=collate,
                evaluate=validation(task, phase.image_size), logits_of=read)
        previous = trained, phase_dir
    model.eval()
    if out_dir is not None:
        save_reference(model, out_dir)
    return model


def _phase_module(model: nn.Module, phase: Phase, with_head: nn.Module) -> nn.Module:
    """What a phase's fit trains: for the nlvr recipe's own phases, the wrapper of
    `nlvr.phases.phase_module`; else the model (with its attribute head if the recipe has one)."""
    if phase.data in nlvr_phases.PHASES:
        return nlvr_phases.phase_module(model, phase)
    return with_head


def load_recipe_phase(model: nn.Module, phase_dir: str | os.PathLike) -> nn.Module:
    """Load the latest checkpoint of a recipe phase (`runs/TASK/phase-…`) into `model`, a fresh
    reference model of the task, whether the phase trained it alone or wrapped for training
    (AttributeHead, or an nlvr phase's ObjectReadouts, FindingReadouts or StatementReader; the
    wrapper is then dropped). For looking at a run before it ships; returns `model`."""
    checkpoint = latest_checkpoint(phase_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {phase_dir}")
    host = json.loads(read_metadata(checkpoint)["host"])["class"]
    wrappers = {AttributeHead: AttributeHead, **nlvr_phases.WRAPPERS}
    wrap = next((make for kind, make in wrappers.items() if host == f"{kind.__module__}.{kind.__qualname__}"),
                None)
    load_trained(wrap(model) if wrap else model, phase_dir)
    return model


def _phase_config(recipe: Recipe, phase: Phase, number: int, phase_dir: Path, progress: bool) -> TrainConfig:
    return TrainConfig(
        train="model", steps=phase.steps, batch_size=recipe.batch_size_of(phase), lr=phase.lr,
        warmup_steps=phase.warmup_steps, weight_decay=recipe.weight_decay, seed=recipe.seed + number,
        num_workers=1, checkpoint_dir=str(phase_dir), checkpoint_every=max(100, phase.steps // 30),
        keep_checkpoints=1, eval_every=max(250, phase.steps // 10), log_path=str(phase_dir / "log.jsonl"),
        progress=progress, precision=recipe.precision,
    )


# det: batches of 8 (a step of Mask R-CNN costs ~5.5 s there) and no self-distillation (a
# detector's eval-mode output is a list of detections, not logits to match)
METHOD_BATCH_SIZES = {"det": 8}
NO_DISTILLATION = ("det",)


def train_method(task: str, method: Method | None, run_dir: str | os.PathLike, steps: int = 400,
                 batch_size: int | None = None, lr: float = 1e-3, model_lr_scale: float = 0.01,
                 precision: Precision = "fp32", progress: bool = True,
                 out_dir: str | os.PathLike | None = None, macs_budget: float | None = None,
                 freeze_host: bool = False, freeze_encoder: bool | None = None,
                 pruning_text: str | None = None, distill: bool | None = None,
                 budget_ramp: float = 0.0) -> nn.Module:
    """Fine-tune `task`'s shipped reference model with `method` on, DynamicViT-style: the method's
    parameters at `lr`, the host at lr · model_lr_scale (a hundredth: the host is already
    trained, and the method's predictors start random), task + keep-ratio + self-distillation
    losses (det: task and keep-ratio), `batch_size` samples a step (default 32; det 8), at the
    native size (224×224; tos 256×256), each step in `precision` ("bf16":
    bfloat16 autocast, see TrainConfig). Checkpoints and the JSONL log go to
    `run_dir` (run again to resume). Returns the patched model in eval mode; load the run later
    with `load_trained`.

    SViT trains by its paper's recipe: the gates at `lr`, the host at 1e-5 (the paper's lr for
    the whole model), the task loss and SViT's own keep-rate loss, no self-distillation. Its
    thresholds are then set on the validation split (`calibrate_reference`): to the schedule's
    targets, or to `macs_budget`, a share of the encoder's dense MACs (gates included).

    With `freeze_host`, only the method's parameters train (TrainConfig(train="method")): the
    host stays the shipped model.

    With `freeze_encoder` (tos only; the default for VLTP, its paper's recipe) the image encoder
    and the text guidance stay frozen: the method's parameters train at `lr` and SAM's mask
    decoder at lr · model_lr_scale (it learns the pruned maps; with `freeze_host` it stays too).
    With `method=None` that is the dense control of such runs. `pruning_text="minilm"` gives the
    tos model the frozen pretrained MiniLM, whose sentence embedding a guided method reads instead
    of the model's own guidance (`TosModel.pruning_text`; such a run is not stored). VLTP trains
    with the task's mask loss and its relevance loss against each sentence's mask, which the
    batches hand the model (`TosModel(masks=...)`), and no distillation. MADTP on nlvr prunes both
    towers with one bank (`patch_reference`) and trains with the task loss and its alignment loss,
    no distillation; with `macs_budget` (a share of both towers' dense MACs) its T is set on the
    validation split to the budget before training (the untrained bank's) and again after it.

    `distill` overrides the recipe's self-distillation (None: the recipe's). With MADTP and a
    `macs_budget`, `budget_ramp` (a share of the steps) lowers the budget trained at from dense to
    `macs_budget` over that share of the run, T set again every RAMP_EVERY steps on RAMP_SAMPLES
    training samples (0: trained at the budget from the start).

    With `method=None` the shipped model is fine-tuned alone, by the same recipe (the host at
    lr · model_lr_scale, the task loss alone): the dense control of a method's run, since part of
    what a method's fine-tuning gains is the host's own.

    With `out_dir`, the trained model and method are stored there (`save_method`; load them with
    `load_method`): the host in fp16, which SViT's thresholds are calibrated on, so that the
    stored model is the one calibrated; a frozen host is not stored (it is the shipped model)."""
    calibrates = method is not None and method.reads_thresholds
    sets_temperature = isinstance(method, MADTP) and macs_budget is not None
    if method is None and (out_dir is not None or freeze_host):
        raise ValueError("method=None fine-tunes the host alone: there is no method to store or to train "
                         "over a frozen host; give a method, or drop out_dir and freeze_host")
    if budget_ramp and not sets_temperature:
        raise ValueError("budget_ramp lowers MADTP's MACs budget over training: give MADTP and a macs_budget")
    if macs_budget is not None and not (calibrates or sets_temperature):
        raise ValueError(f"macs_budget sets a method's thresholds or temperature; {method} has none to set. "
                         "Drop the budget, or train SViT with per_image=False and keep < 1, VLTP with "
                         "by_threshold=True, or MADTP")
    model = load_reference(task)
    if pruning_text is not None:
        if pruning_text != "minilm" or not isinstance(model, TosModel) or out_dir is not None:
            raise ValueError("pruning_text='minilm' gives the tos model's guided pruning the pretrained "
                             "MiniLM, for a run that is not stored: give task 'tos' and no out_dir")
        model.pruning_text = build_guidance(pruning_text).requires_grad_(False)
    if method is not None:
        patch_reference(model, method)
    size = IMAGE_SIZES[task]
    batch_size = batch_size or METHOD_BATCH_SIZES.get(task, 32)
    # SViT's, VLTP's and MADTP's recipes have no self-distillation; the dense control would distil from itself
    distills = (task not in NO_DISTILLATION and method is not None
                and not isinstance(method, (SViT, VLTP, MADTP))) if distill is None else distill
    collate = task_collate(task, size)
    trainable = {param: param.requires_grad for param in model.parameters()}
    encoder_frozen = isinstance(method, VLTP) if freeze_encoder is None else freeze_encoder
    if encoder_frozen and not freeze_host:
        _train_only_mask_decoder(model)
    if TARGET in call_input_names(image_encoder(model)):
        collate = _with_target_masks(collate)
    config = TrainConfig(
        train="method" if freeze_host else "model", steps=steps, batch_size=batch_size, lr=lr,
        model_lr_scale=model_lr_scale,
        distill_weight=TrainConfig.distill_weight if distills else 0.0,
        warmup_steps=max(1, steps // 20), num_workers=1, checkpoint_dir=os.fspath(run_dir),
        checkpoint_every=50, keep_checkpoints=1, log_path=os.fspath(Path(run_dir) / "log.jsonl"),
        precision=precision, progress=progress,
    )
    data = make_dataset(task, "train", size=steps * batch_size, image_size=size)
    ramp = None
    if sets_temperature and budget_ramp:
        ramp = _BudgetRamp(task, macs_budget, max(1, round(budget_ramp * steps)))
        if finished_steps(run_dir) == 0:
            ramp(model, 0)
    elif sets_temperature:  # train at the budget: T set on validation for the untrained bank first
        calibrate_reference(model, task, macs_budget)
    try:
        fit(model, data, task_loss(task), config, collate_fn=collate, evaluate=validation(task, size),
            logits_of=task_logits(task), after_step=ramp)
    finally:
        for param, flag in trainable.items():
            param.requires_grad_(flag)
    model.eval()
    if out_dir is not None:
        store_trained(model, task, out_dir, macs_budget, freeze_host, encoder_frozen)
    elif calibrates or sets_temperature:
        calibrate_reference(model, task, macs_budget)
    return model


RAMP_EVERY = 25  # steps between two settings of T along a budget ramp
RAMP_SAMPLES = 128  # training samples T is set on along the ramp (the validation split is for choices)
RAMP_TOLERANCE = 0.05  # of each step's budget: the ramp's steps need not be exact
RAMP_ROUNDS = 12  # passes over the samples per setting: a budget in a jump of the curve is never met


class _BudgetRamp:
    """`fit`'s after_step for MADTP trained toward `budget`: every RAMP_EVERY steps until `end`,
    T is set on training samples so that the towers spend a budget falling linearly from dense (at
    step 0) to `budget` (from step end − RAMP_EVERY on)."""

    def __init__(self, task: str, budget: float, end: int) -> None:
        self.budget, self.end = budget, end
        self.batches = calibration_batches(task, "train", RAMP_SAMPLES)

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % RAMP_EVERY or step >= self.end:
            return
        share = self.budget + (1.0 - self.budget) * max(0.0, 1.0 - (step + RAMP_EVERY) / self.end)
        # a share in a jump of the curve, or past what T reaches: the nearest share T reached
        calibrate_temperature(model, self.batches, macs_budget=share, tolerance=RAMP_TOLERANCE,
                              max_rounds=RAMP_ROUNDS, nearest=True)


def store_trained(model: nn.Module, task: str, out_dir: str | os.PathLike, macs_budget: float | None = None,
                  freeze_host: bool = False, freeze_encoder: bool = False) -> Path:
    """Store `task`'s reference model trained with a method (patched by `patch_reference`, e.g. a
    run loaded with `load_trained`) as `train_method(..., out_dir=...)` does: the host rounded to
    fp16 as stored (unless the run froze it), the method's thresholds or MADTP's T then set on
    the validation split (to `macs_budget`, or to the method's schedule), so that what is stored
    is what was calibrated; then `save_method`. Load it with `load_method`."""
    method = sieve_of(image_encoder(model)).method
    model.eval()
    if not freeze_host:  # a frozen host is the shipped fp16 model already
        _round_to_half(model)
    if method.reads_thresholds or (isinstance(method, MADTP) and macs_budget is not None):
        calibrate_reference(model, task, macs_budget)
    return save_method(model, out_dir, shipped_host=task if freeze_host or freeze_encoder else None,
                       trained_parts=TOS_TRAINED_PARTS if freeze_encoder and not freeze_host else ())


TOS_TRAINED_PARTS = ("sam.mask_decoder",)  # what VLTP's recipe trains of the tos model, besides the method


def _train_only_mask_decoder(model: nn.Module) -> None:
    """VLTP's recipe on the tos model: every host parameter frozen but SAM's mask decoder's."""
    if not isinstance(model, TosModel):
        raise ValueError("a frozen encoder with a trained mask decoder (VLTP's recipe) is the tos reference "
                         f"model's (a SAM encoder guided by a sentence), not {type(model).__name__}'s")
    model.requires_grad_(False)
    for part in TOS_TRAINED_PARTS:
        model.get_submodule(part).requires_grad_(True)


def _with_target_masks(collate: Callable[[list[dict]], tuple]) -> Callable[[list[dict]], tuple]:
    """`collate` with each sentence's target mask also handed to the model (`masks`), for a method
    that learns from it."""

    def with_masks(samples: list[dict]) -> tuple[dict, Tensor]:
        inputs, targets = collate(samples)
        return {**inputs, "masks": targets}, targets

    return with_masks


@torch.no_grad()
def _round_to_half(model: nn.Module) -> None:
    """The model's weights as fp16 storage holds them, so that what is measured on it afterwards
    (SViT's calibration) holds for the stored model."""
    for value in model.state_dict().values():
        if value.is_floating_point():
            value.copy_(value.half().float())

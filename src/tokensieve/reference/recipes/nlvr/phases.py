"""The nlvr recipe's own phases, as `train_reference` runs them: "objects" and "finding" train
the vision tower with readouts (perception.py), "tokens" trains the text side over the frozen
tower's tokens (statements.py). Each wraps the BLIP model for its fit; the wrappers are dropped
when the model ships, and `WRAPPERS` lets `load_recipe_phase` take the model out of a phase's
checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import transformers
from torch import nn

from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.recipes.definitions import Phase
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
from tokensieve.reference.recipes.phases import whole_output
from tokensieve.train import TrainConfig, fit

PHASES = ("objects", "finding", "tokens")  # the `Phase.data` of the phases run here
READOUT_VALIDATION_SCENES = 128  # the scenes an "objects" or "finding" phase's readouts are scored on


def phase_module(model: nn.Module, phase: Phase) -> nn.Module:
    """What an nlvr phase's fit trains: the vision tower with its object readouts ("objects"),
    with the finding readout too ("finding"), or the text side over given image tokens
    ("tokens"). `model` is the nlvr model (BLIP), and the phase runs at the tower's native size."""
    if phase.data not in PHASES:
        raise ValueError(f"Phase(data={phase.data!r}) is not one of the nlvr recipe's own phases {PHASES}")
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
    return StatementReader(model)


def finding_readouts(model: transformers.BlipForImageTextRetrieval) -> FindingReadouts:
    """The nlvr tower with its finding readout, whose keys are as wide as a head of the text
    encoder's cross-attention: the statements phase starts its grounded heads from them."""
    text = model.config.text_config
    return FindingReadouts(model.vision_model, key_width=text.hidden_size // text.num_attention_heads)


# The wrappers a phase's checkpoint may hold, and how each wraps a fresh nlvr model.
WRAPPERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    ObjectReadouts: lambda blip: ObjectReadouts(blip.vision_model),
    FindingReadouts: finding_readouts,
    StatementReader: StatementReader,
}


def fit_phase(model: transformers.BlipForImageTextRetrieval, trained: nn.Module, phase: Phase,
              config: TrainConfig, start: nn.Module | None,
              validation: Callable[[nn.Module], dict[str, float]]) -> None:
    """Fit `trained` (`phase_module(model, phase)`) by `config`. `start` is the last phase's
    module when this phase starts fresh: a statements phase after a finding phase starts its
    reader's grounded heads from the finding readout's keys. `validation` scores the nlvr model
    at the end of a statements phase; a perception phase scores its readouts instead."""
    patch = model.config.vision_config.patch_size
    if phase.data in ("objects", "finding"):
        scenes = NlvrObjects("train", size=phase.steps * config.batch_size, image_size=phase.image_size,
                             patch=patch)
        fit(trained, scenes, readout_loss, config, collate_fn=readouts_collate,
            evaluate=_readout_validation, logits_of=whole_output)
        return
    statements = NlvrGrounded("train", size=phase.scenes, image_size=phase.image_size, patch=patch)
    data = TowerTokens(statements, model.vision_model, progress=config.progress, precision=config.precision)
    if isinstance(start, FindingReadouts):
        seed_grounding(trained, start)  # a fresh reader's grounded heads start from its keys
    with _frozen(model.vision_model):
        fit(trained, data, statements_loss, config, collate_fn=statements_collate,
            evaluate=lambda reader: validation(reader.model), logits_of=whole_output)


def _readout_validation(readouts: ObjectReadouts) -> dict[str, float]:
    data = NlvrObjects("val", size=READOUT_VALIDATION_SCENES, image_size=IMAGE_SIZES["nlvr"],
                       patch=readouts.tower.config.patch_size)
    return readout_accuracy(readouts, [data[i] for i in range(len(data))])


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

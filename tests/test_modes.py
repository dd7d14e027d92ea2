"""Every place that switches a model between training and eval mode for a while gives each
sub-module back its own mode, not the top-level one."""

from __future__ import annotations

import pytest
import torch
from test_reference_vl import tiny
from test_train_support import patched_model, quiet_config, random_dataset

import tokensieve as ts
from tokensieve.modes import in_mode
from tokensieve.reference import build_model, evaluate
from tokensieve.reference.recipes.nlvr.statements import NlvrGrounded, TowerTokens
from tokensieve.tasks import make_dataset
from tokensieve.train import cross_entropy, fit


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _mixed(model: torch.nn.Module, training: bool) -> torch.nn.Module:
    """`model` in mode `training`, with a sub-module halfway down its tree and its last one in the
    other mode."""
    model.train(training)
    modules = list(model.modules())
    modules[len(modules) // 2].train(not training)
    modules[-1].train(not training)
    return model


def test_in_mode_gives_each_sub_module_its_own_mode_back_even_after_an_error():
    model = _mixed(patched_model(), training=True)
    before = _modes(model)
    with pytest.raises(RuntimeError, match="inside"), in_mode(model, training=False):
        assert not any(_modes(model).values())
        raise RuntimeError("inside")
    assert _modes(model) == before


@pytest.mark.parametrize("training", [True, False])
def test_flops_gives_each_sub_module_its_own_mode_back(training):
    model = _mixed(patched_model(ts.EViT(keep=0.5, layers=(1,))), training)
    before = _modes(model)
    ts.flops(model, torch.randn(1, 3, 32, 32))
    assert _modes(model) == before


def test_fit_trains_in_training_mode_and_gives_each_sub_module_its_own_mode_back():
    model = _mixed(patched_model(), training=False)
    before = _modes(model)
    seen = {"train": [], "eval": []}

    def task_loss(logits, targets):
        seen["train"].append(all(_modes(model).values()))
        return cross_entropy(logits, targets)

    def check(evaluated):
        seen["eval"].append(not any(_modes(evaluated).values()))
        return {}

    fit(model, random_dataset(16), task_loss, quiet_config(steps=2, eval_every=1), evaluate=check)
    assert seen == {"train": [True, True], "eval": [True, True]}  # the teacher and evaluation put it back
    assert _modes(model) == before


def test_fit_gives_the_modes_back_after_an_error():
    model = _mixed(patched_model(), training=True)
    before = _modes(model)

    def failing_loss(logits, targets):
        raise RuntimeError("task loss failed")

    with pytest.raises(RuntimeError, match="task loss failed"):
        fit(model, random_dataset(16), failing_loss, quiet_config(steps=1))
    assert _modes(model) == before


def test_reference_evaluation_gives_each_sub_module_its_own_mode_back():
    model = _mixed(build_model("cls"), training=True)
    before = _modes(model)
    evaluate(model, "cls", make_dataset("cls", "val", size=2, image_size=64), progress=False)
    assert _modes(model) == before


def test_caching_tower_tokens_gives_each_sub_module_its_own_mode_back():
    tower = _mixed(tiny("nlvr").vision_model, training=True)
    before = _modes(tower)
    TowerTokens(NlvrGrounded("val", size=1, patch=tower.config.patch_size), tower, progress=False)
    assert _modes(tower) == before

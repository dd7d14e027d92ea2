"""DynamicViT trained with the engine on an easy synthetic task: the keep-ratio loss pulls each
stage's kept share to its target (and without it the share stays where it started), while the
task loss goes down."""

import pytest
import torch
from test_train_support import DYNAMICVIT, easy_dataset, patched_model, quiet_config

import tokensieve as ts
from tokensieve.train import cross_entropy, fit

STEPS = 60
TARGETS = torch.tensor([DYNAMICVIT.keep, DYNAMICVIT.keep**2])  # stages at layers 1 and 2


def _train(keep_ratio_weight: float):
    model = patched_model(method_seed=1)
    with torch.no_grad():  # start the predictors far below the target: most tokens dropped
        for predictor in ts.sieve_of(model).parts[0].values():
            predictor.head[-1].bias.copy_(torch.tensor([1.0, -1.0]))  # (drop, keep) logits
    # The predictors learn at lr, the host at a fifth of it, as DynamicViT trains its predictors faster.
    config = quiet_config(train="model", steps=STEPS, batch_size=16, lr=1e-2, model_lr_scale=0.2,
                          warmup_steps=4, keep_ratio_weight=keep_ratio_weight)
    return fit(model, easy_dataset(512), cross_entropy, config).history


def _distance_to_targets(records) -> float:
    shares = torch.tensor([r.keep_per_stage for r in records])  # [steps, stages]
    return (shares - TARGETS).abs().mean().item()


@pytest.fixture(scope="module")
def history():
    return _train(keep_ratio_weight=2.0)


def test_the_keep_ratio_loss_brings_each_stage_to_its_target(history):
    start, end = _distance_to_targets(history[:5]), _distance_to_targets(history[-10:])
    assert start > 0.4  # the predictors start far off: ~0.1 and ~0.01 kept against 0.7 and 0.49
    assert end < 0.1
    assert history[-1].loss_keep_ratio < 0.1 * history[0].loss_keep_ratio


def test_without_the_keep_ratio_loss_the_share_stays_far_from_the_target():
    assert _distance_to_targets(_train(keep_ratio_weight=0.0)[-10:]) > 0.3


def test_the_task_loss_and_the_total_loss_go_down(history):
    def mean(key, records):
        return sum(getattr(r, key) for r in records) / len(records)

    for key in ("loss_task", "loss"):
        assert mean(key, history[-10:]) < 0.85 * mean(key, history[:10]), key

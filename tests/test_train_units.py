"""The pieces of the training engine on their own: losses, schedule, batching, config."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from test_train_support import PATCHES, patched_model, random_dataset, tiny_model
from torch.utils.data import TensorDataset

import tokensieve as ts
from tokensieve.train import (
    TrainConfig,
    WarmupCosine,
    cross_entropy,
    distillation_loss,
    fit,
    keep_ratio_loss,
    keep_ratio_stages,
    logits_of,
    pixel_cross_entropy,
    warmup_cosine,
)
from tokensieve.train.data import epoch_batches, shard_batch


def test_keep_ratio_loss_is_the_mean_over_stages_of_each_samples_squared_miss():
    first = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # shares 0.5 and 1.0
    second = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # shares 0.25 and 0.0
    loss = keep_ratio_loss([(first, 0.5), (second, 0.25)])
    expected = ((0.0 + 0.25) / 2 + (0.0 + 0.0625) / 2) / 2
    assert loss.item() == pytest.approx(expected)
    # Per sample, not per batch: two samples missing in opposite directions do not cancel.
    assert keep_ratio_loss([(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 0.5)]).item() == pytest.approx(0.25)


def test_keep_ratio_stages_pair_each_recorded_decision_with_keep_to_the_stage():
    model = patched_model().train()
    with ts.trace(model) as traces:
        model(random_dataset(3).tensors[0][:3])
    stages = keep_ratio_stages(traces)
    assert [target for _, target in stages] == pytest.approx([0.7, 0.49])
    assert all(decisions.shape == (3, PATCHES) and decisions.requires_grad for decisions, _ in stages)
    model.eval()
    with ts.trace(model) as traces:
        model(random_dataset(3).tensors[0][:3])
    assert keep_ratio_stages(traces) == []  # inference records no decisions


def test_distillation_is_zero_for_the_teachers_own_logits_and_scales_with_temperature_squared():
    teacher = torch.randn(4, 5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.randn(4, 5)
    plain = torch.nn.functional.kl_div(student.log_softmax(1), teacher.log_softmax(1), reduction="batchmean",
                                       log_target=True)
    assert distillation_loss(student, teacher).item() == pytest.approx(plain.item())
    soft = torch.nn.functional.kl_div((student / 2).log_softmax(1), (teacher / 2).log_softmax(1),
                                      reduction="batchmean", log_target=True)
    assert distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(4 * soft.item())


def test_distillation_of_dense_logits_averages_over_pixels():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    as_rows = distillation_loss(student.permute(0, 2, 3, 1).reshape(-1, 3),
                                teacher.permute(0, 2, 3, 1).reshape(-1, 3))
    assert distillation_loss(student, teacher).item() == pytest.approx(as_rows.item())


def test_pixel_cross_entropy_upsamples_logits_and_ignores_255():
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 10.0  # class 1 everywhere
    labels = torch.ones(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 255
    assert pixel_cross_entropy(logits, labels).item() < 1e-3


def test_logits_of_reads_tensors_model_outputs_and_tuples():
    logits = torch.randn(2, 3)

    class Output:
        def __init__(self):
            self.logits = logits

    assert logits_of(logits) is logits and logits_of(Output()) is logits and logits_of((logits, 1)) is logits
    with pytest.raises(TypeError, match="logits_of"):
        logits_of({"x": 1})


def test_warmup_then_cosine_to_the_floor():
    schedule = WarmupCosine(total=10, warmup=4, floor=0.1)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = [schedule(s) for s in range(4, 11)]
    assert after[0] == 1.0 and after[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(after))


def test_a_resumed_scheduler_gives_the_lr_of_an_uninterrupted_one():
    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    straight_optimizer = optimizer()
    straight = warmup_cosine(straight_optimizer, 10, 3, 0.1)
    lrs = []
    for _ in range(10):
        lrs.append(straight_optimizer.param_groups[0]["lr"])
        straight_optimizer.step()
        straight.step()
    resumed_optimizer = optimizer()
    warmup_cosine(resumed_optimizer, 10, 3, 0.1, steps_done=6)
    assert resumed_optimizer.param_groups[0]["lr"] == lrs[6]


def test_dataset_batches_depend_on_seed_and_epoch_and_two_ranks_share_each_batch():
    data = TensorDataset(torch.arange(20), torch.arange(20))

    def order(epoch, seed=0, skip=0, rank=0, world=1):
        batches = epoch_batches(data, epoch, skip, seed=seed, batch_size=4, rank=rank, world_size=world)
        return [inputs.tolist() for inputs, _ in batches]

    whole = order(0)
    assert len(whole) == 5 and sorted(i for batch in whole for i in batch) == list(range(20))
    assert order(0) == whole and order(1) != whole and order(0, seed=1) != whole
    assert order(0, skip=2) == whole[2:]
    halves = zip(order(0, rank=0, world=2), order(0, rank=1, world=2), strict=True)
    assert [a + b for a, b in halves] == whole
    with pytest.raises(ValueError, match="multiple of 3"):
        order(0, world=3)


def test_shard_batch_cuts_tensors_and_lists_and_walks_into_dicts():
    batch = ({"pixel_values": torch.arange(4), "captions": ["a", "b", "c", "d"]}, torch.arange(4) * 10)
    inputs, targets = shard_batch(batch, rank=1, world_size=2)
    assert inputs["pixel_values"].tolist() == [2, 3] and inputs["captions"] == ["c", "d"]
    assert targets.tolist() == [20, 30]


@pytest.mark.parametrize("settings, message", [
    ({}, "exactly one of steps"),
    ({"steps": 1, "epochs": 1}, "exactly one of steps"),
    ({"steps": 1, "train": "head"}, "use 'method'"),
    ({"steps": 0}, r"steps=0\): use steps >= 1"),
    ({"steps": 1, "min_lr_ratio": 2.0}, r"\[0, 1\]"),
    ({"steps": 1, "grad_clip_norm": 0.0}, "None for no clipping"),
    ({"steps": 1, "lr": -1}, r"lr=-1\): use a value >= 0"),
    ({"steps": 1, "lr": float("nan")}, r"lr=nan\): use a finite number"),
    ({"steps": 1, "batch_size": 0}, r"batch_size=0\): use batch_size >= 1"),
    ({"steps": 4, "warmup_steps": 5}, r"warmup_steps=5\): use at most steps=4"),
    ({"steps": 1, "grad_clip_norm": float("inf")}, "None for no clipping"),
    ({"steps": 1, "grad_clip_norm": -1.0}, "None for no clipping"),
    ({"steps": 1, "precision": "fp16"}, "use 'fp32' or 'bf16'"),
    ({"steps": 1, "weight_decay": -0.1}, r"weight_decay=-0\.1\): use a value >= 0"),
    ({"steps": 1, "task_weight": -1.0}, r"task_weight=-1\.0\): use a value >= 0"),
    ({"steps": 1, "keep_ratio_weight": float("inf")}, r"keep_ratio_weight=inf\): use a finite number"),
    ({"steps": 1, "distill_temperature": 0.0}, r"distill_temperature=0\.0\): use a value > 0"),
    ({"steps": 1, "model_lr_scale": -1.0}, r"model_lr_scale=-1\.0\): use a value >= 0"),
    ({"steps": 1, "num_workers": -1}, r"num_workers=-1\): use num_workers >= 0"),
    ({"steps": 1, "keep_checkpoints": 0}, r"keep_checkpoints=0\): use keep_checkpoints >= 1"),
    ({"steps": 1, "eval_every": -2}, r"eval_every=-2\): use eval_every >= 0"),
    ({"steps": 1, "log_path": ""}, r"log_path=''\): use a path"),
])
def test_config_values_out_of_range_are_value_errors_naming_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"steps": 2.5}, r"steps=2\.5\): steps is a whole number"),
    ({"epochs": 1.5}, r"epochs=1\.5\): epochs is a whole number"),
    ({"steps": True}, r"steps=True\): steps is a whole number"),
    ({"steps": "10"}, r"steps='10'\): steps is a whole number.*without quotes"),
    ({"steps": 1, "train": 1}, r"train=1\): use 'method'"),
    ({"steps": 1, "lr": "1e-3"}, r"lr='1e-3'\): lr is a number.*without quotes"),
    ({"steps": 1, "batch_size": 8.0}, r"batch_size=8\.0\): batch_size is a whole number"),
    ({"steps": 4, "warmup_steps": 1.5}, r"warmup_steps=1\.5\): warmup_steps is a whole number"),
    ({"steps": 1, "grad_clip_norm": "1"}, r"grad_clip_norm='1'\): grad_clip_norm is a number"),
    ({"steps": 1, "precision": 16}, "use 'fp32' or 'bf16'"),
    ({"steps": 1, "distill_weight": None}, r"distill_weight=None\): distill_weight is a number"),
    ({"steps": 1, "seed": 0.5}, r"seed=0\.5\): seed is a whole number"),
    ({"steps": 1, "checkpoint_every": 2.5}, r"checkpoint_every=2\.5\): checkpoint_every is a whole number"),
    ({"steps": 1, "resume": "yes"}, r"resume='yes'\): resume is True or False"),
    ({"steps": 1, "progress": 1}, r"progress=1\): progress is True or False"),
    ({"steps": 1, "checkpoint_dir": 3}, r"checkpoint_dir=3\): use a path"),
])
def test_config_values_of_the_wrong_kind_are_type_errors_naming_the_fix(settings, message):
    with pytest.raises(TypeError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_config_field_is_checked_when_the_config_is_made(name):
    settings = {"epochs": object()} if name == "epochs" else {"steps": 1, name: object()}
    with pytest.raises(TypeError, match=rf"TrainConfig\({name}=<object"):
        TrainConfig(**settings)


def test_config_takes_numpy_and_integer_numbers_as_plain_python_ones():
    config = TrainConfig(steps=np.int64(3), batch_size=np.int32(8), lr=1, warmup_steps=np.int64(1))
    assert type(config.steps) is int and type(config.batch_size) is int and type(config.lr) is float
    assert TrainConfig.from_json(config.to_json()) == config


def test_config_round_trips_through_json_with_paths_as_strings(tmp_path):
    config = TrainConfig(steps=3, checkpoint_dir=tmp_path / "run")
    assert config.checkpoint_dir == str(tmp_path / "run")
    assert TrainConfig.from_json(config.to_json()) == config


def test_training_a_method_without_parameters_asks_for_train_model():
    with pytest.raises(ValueError, match="train='model'"):
        fit(patched_model(ts.EViT(layers=(1,))), random_dataset(8), cross_entropy, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="not patched"):
        fit(tiny_model(), random_dataset(8), cross_entropy, TrainConfig(steps=1))


def test_a_warm_up_longer_than_a_run_given_in_epochs_is_refused_before_training():
    config = TrainConfig(epochs=1, batch_size=8, warmup_steps=3, progress=False)  # 16 samples: 2 steps
    with pytest.raises(ValueError, match=r"warmup_steps=3\): use at most the run's 2 steps"):
        fit(patched_model(), random_dataset(16), cross_entropy, config)

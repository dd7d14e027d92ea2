"""load_reference refuses a directory that does not hold every weight of the model asked for,
rather than filling the gap with random initial values."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokensieve.reference import TASKS, build_model, load_reference, save_reference, shipped_weights

# the tasks whose weights the package ships (a model ships once it meets its target)
SHIPPED = [task for task in TASKS if (shipped_weights(task) / "config.json").is_file()]


@pytest.mark.parametrize("task, other", [(task, other) for task, other in itertools.permutations(TASKS, 2)
                                         if other in SHIPPED])
def test_another_tasks_shipped_directory_is_refused_naming_its_task(task, other):
    with pytest.raises(ValueError, match=rf"holds the {other} reference model.*load_reference\('{other}'"):
        load_reference(task, shipped_weights(other))


def test_a_classifier_directory_without_the_head_weights_is_refused_naming_them(tmp_path):
    save_reference(build_model("cls"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["classifier.weight"], weights["classifier.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"classifier\.bias.*classifier\.weight.*tokensieve train cls"):
        load_reference("cls", tmp_path)


def test_a_directory_of_unknown_task_is_checked_by_its_weights(tmp_path):
    """A config without `architectures` cannot say its task: the missing weights still refuse it."""
    save_reference(build_model("seg"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks.*classifier\.bias"):
        load_reference("cls", tmp_path)


def test_a_seg_directory_with_an_incomplete_head_is_refused_naming_the_file(tmp_path):
    save_reference(build_model("seg"), tmp_path)
    head = load_file(tmp_path / "head.safetensors")
    dropped = sorted(head)[-1]
    del head[dropped]
    save_file(head, tmp_path / "head.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"head\.safetensors lacks.*{dropped}"):
        load_reference("seg", tmp_path)


def test_a_task_without_shipped_weights_names_the_command_that_trains_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no reference weights for 'det'.*tokensieve train det"):
        load_reference("det", tmp_path)


def test_a_complete_directory_written_by_save_reference_loads_every_weight(tmp_path):
    model = build_model("cls")
    save_reference(model, tmp_path)
    loaded = load_reference("cls", tmp_path)
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(value.half().float(), other), name

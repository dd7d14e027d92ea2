"""The training-only colour×shape head: what it reads, what its loss counts, what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from test_reference_tos import tiny_tos
from test_reference_vl import tiny

from tokensieve.reference.recipes.auxiliary import (
    ATTRIBUTE_WEIGHT,
    AttributeHead,
    attribute_loss,
    with_attributes,
)
from tokensieve.reference.tos import encode_resized
from tokensieve.reference.vl import text_inputs
from tokensieve.tasks import collate, make_dataset
from tokensieve.tasks.scenes import ATTRIBUTE_CLASSES


def _vl_inputs(task: str, size: int) -> dict:
    batch = collate([make_dataset(task, "val", size=2, image_size=size)[i] for i in range(2)])
    input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
    return {"pixel_values": batch["image"], "input_ids": input_ids, "attention_mask": attention_mask,
            "interpolate_pos_encoding": size != 224}


@pytest.mark.parametrize("task", ["nlvr", "retrieval"])
def test_the_head_reads_the_vision_towers_patch_grid_and_leaves_the_output_alone(task):
    model = tiny(task)
    wrapped = AttributeHead(model).eval()
    inputs = _vl_inputs(task, 96)
    with torch.no_grad():
        got = wrapped(**inputs)
        expected = model(**inputs)
        tokens = model.vision_model(pixel_values=inputs["pixel_values"],
                                    interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    key = "itm_score" if task == "nlvr" else "logits_per_image"
    torch.testing.assert_close(getattr(got.output, key), getattr(expected, key))
    assert got.attribute_logits.shape == (2, ATTRIBUTE_CLASSES, 3, 3)  # 96 px in patches of 32
    grid = tokens.transpose(1, 2).reshape(2, -1, 3, 3)  # patch (row r, column c) is token 3 r + c
    torch.testing.assert_close(got.attribute_logits, wrapped.head(grid))


def test_the_head_reads_the_sam_neck_at_any_image_size():
    model = tiny_tos().eval()
    wrapped = AttributeHead(model)
    images = torch.rand(2, 3, 64, 64)  # not the native 96: the resized path runs the neck too
    with torch.no_grad():
        got = wrapped(images, text=["the red star", "every circle"])
        neck = encode_resized(model.sam.vision_encoder, images)
    torch.testing.assert_close(got.attribute_logits, wrapped.head(neck))
    assert got.attribute_logits.shape == (2, ATTRIBUTE_CLASSES, 4, 4)


def test_the_attribute_loss_reads_labels_at_the_centre_of_each_4x4_block():
    labels = torch.zeros(2, 32, 32, dtype=torch.uint8)
    labels[:, 4:12, 4:12] = 7  # covers block centres 6 and 10 in each direction: 4 of the 8×8
    background = torch.full((2, ATTRIBUTE_CLASSES, 2, 2), -30.0)
    background[:, 0] = 30.0  # sure of background everywhere: 60 nats wrong at those 4 centres
    torch.testing.assert_close(attribute_loss(background, labels), torch.tensor(60.0 * 4 / 64), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="4×4 blocks"):
        attribute_loss(background, labels[:, :30, :30])


def test_the_recipe_loss_is_the_task_loss_plus_the_weighted_attribute_loss():
    model = tiny("nlvr")
    wrapped = AttributeHead(model)
    inputs = _vl_inputs("nlvr", 96)
    labels = torch.randint(0, ATTRIBUTE_CLASSES, (2, 96, 96), dtype=torch.uint8)
    output = wrapped(**inputs)
    task = torch.nn.functional.cross_entropy(output.output.itm_score, torch.tensor([1, 0]))
    loss = with_attributes(torch.nn.functional.cross_entropy, lambda o: o.itm_score)(
        output, {"task": torch.tensor([1, 0]), "attributes": labels})
    expected = task + ATTRIBUTE_WEIGHT * attribute_loss(output.attribute_logits, labels)
    torch.testing.assert_close(loss, expected)


def test_only_the_reference_models_with_an_image_map_take_the_head():
    with pytest.raises(TypeError, match="TosModel"):
        AttributeHead(torch.nn.Linear(2, 2))

"""The nlvr tower's object readouts: the scenes they learn from, what each reads, how they are scored."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from test_reference_vl import tiny

from tokensieve.reference.recipes.nlvr.perception import (
    KINDS,
    MAX_OBJECTS,
    FindingReadouts,
    NlvrObjects,
    ObjectReadouts,
    ReadoutLogits,
    readout_accuracy,
    readout_loss,
    readouts_collate,
    where_targets,
)
from tokensieve.tasks.nlvr import IGNORED
from tokensieve.tasks.scenes import ATTRIBUTE_CLASSES, attribute_class


def _samples(count: int = 3, patch: int = 16) -> list[dict]:
    data = NlvrObjects("val", size=count, patch=patch)
    return [data[i] for i in range(count)]


def test_object_tables_list_each_objects_class_and_centre():
    data = NlvrObjects("val", size=2)
    sample = data[1]
    scene, _ = data.scene(1)
    count = len(scene.objects)
    assert sample["classes"][:count].tolist() == [attribute_class(obj) - 1 for obj in scene.objects]
    assert (sample["classes"][count:] == IGNORED).all() and (sample["sizes"][count:] == -1).all()
    expected = torch.tensor([obj.center for obj in scene.objects]) / 224
    torch.testing.assert_close(sample["centres"][:count], expected)
    assert sample["centres"][count:].isnan().all()
    assert set(sample["instances"].unique().tolist()) <= set(range(-1, count))


def test_where_targets_give_each_patch_its_objects_centre_and_flag_the_centre_patches():
    samples = _samples()
    _, targets = readouts_collate(samples)
    centres, flags = where_targets(targets, side=14)
    for row, sample in enumerate(samples):
        middles = sample["instances"][8::16, 8::16]  # the object seen at each patch's middle pixel
        for r, c in [(r, c) for r in range(14) for c in range(14)]:
            slot = int(middles[r, c])
            if slot < 0:
                assert centres[row, :, r, c].isnan().all()
            else:
                torch.testing.assert_close(centres[row, :, r, c], sample["centres"][slot])
        cells = {(int(y) // 16, int(x) // 16) for x, y in sample["centre_pixels"].tolist() if x >= 0}
        assert {tuple(cell) for cell in flags[row].nonzero().tolist()} == cells


def test_object_readouts_pool_only_the_objects_own_patches():
    readouts = ObjectReadouts(tiny("nlvr").vision_model).eval()
    samples = _samples(1)
    inputs, _ = readouts_collate(samples)
    with torch.no_grad():
        logits = readouts(**inputs)
        tokens = readouts.tower(pixel_values=inputs["pixel_values"]).last_hidden_state[0, 1:]
    # the mean readout: the tokens weighted by how much of each 32-px patch the object covers
    slot = int(samples[0]["sizes"].argmax())
    cover = F.avg_pool2d((samples[0]["instances"] == slot).float()[None], 32).flatten()
    expected = readouts.mean((cover[:, None] * tokens).sum(0) / cover.sum())
    torch.testing.assert_close(logits.mean[0, slot], expected, rtol=1e-4, atol=1e-5)
    assert logits.positions.shape[-2:] == (7, 7) and logits.where.shape == (1, 3, 7, 7)
    assert logits.attention.shape == (1, MAX_OBJECTS, logits.mean.shape[-1])


def test_the_readout_loss_trains_the_tower_and_perfect_logits_score_one():
    readouts = ObjectReadouts(tiny("nlvr").vision_model)
    samples = _samples(2)
    inputs, targets = readouts_collate(samples)
    loss = readout_loss(readouts(**inputs), targets)
    loss.backward()
    assert torch.isfinite(loss) and readouts.tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0

    class Oracle(torch.nn.Module):  # logits that name every object and centre right
        def forward(self, pixel_values, instances):
            classes = targets["classes"].clamp_min(0)
            named = F.one_hot(classes, ATTRIBUTE_CLASSES - 1).float() * 20
            centres, flags = where_targets(targets, 14)
            where = torch.cat([centres.nan_to_num(0.0), (flags * 40 - 20)[:, None]], dim=1)
            positions = torch.zeros(2, ATTRIBUTE_CLASSES, 14, 14)
            return ReadoutLogits(positions=positions, mean=named, attention=named, where=where)

    scores = readout_accuracy(Oracle(), samples)
    assert scores == {"objects_named": 1.0, "shapes_named": 1.0, "centres_found": 1.0, "centre_error": 0.0}


def test_the_finding_readout_attends_over_every_token_and_its_loss_is_least_at_the_targets():
    readouts = FindingReadouts(tiny("nlvr").vision_model)
    patch = readouts.tower.config.patch_size
    inputs, targets = readouts_collate(_samples(2, patch))
    logits = readouts(**inputs)
    tokens = 1 + (224 // patch) ** 2
    assert logits.finding.shape == (2, len(KINDS), tokens) == targets["finding"].shape
    assert torch.allclose(logits.finding.exp().sum(-1), torch.ones(2, len(KINDS)), atol=1e-5)
    assert torch.allclose(targets["finding"].sum(-1), torch.ones(2, len(KINDS)))

    without = readout_loss(replace(logits, finding=None), targets)
    at_targets = replace(logits, finding=targets["finding"].clamp_min(1e-12).log())
    elsewhere = replace(logits, finding=targets["finding"].flip(-1).clamp_min(1e-12).log_softmax(-1))
    entropy = -(targets["finding"] * targets["finding"].clamp_min(1e-12).log()).sum(-1).mean()
    assert torch.allclose(readout_loss(at_targets, targets) - without, entropy, atol=1e-5)
    assert readout_loss(elsewhere, targets) > readout_loss(at_targets, targets)
    readout_loss(logits, targets).backward()
    assert readouts.finding_queries.grad.abs().sum() > 0 and readouts.finding_keys.weight.grad.abs().sum() > 0

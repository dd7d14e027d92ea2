"""cls: the label is the one class type present (the most frequent one, with rivals), and the other
objects are built to confuse."""

from collections import Counter

import numpy as np
import torch

from tokensieve.tasks import CLS_TYPES, ClsConfig, make_dataset
from tokensieve.tasks.cls import sample_cls_scene
from tokensieve.tasks.scenes import render

SCENES = 200


def _scenes(config: ClsConfig | None = None):
    config = config or ClsConfig()
    return [sample_cls_scene(np.random.default_rng(seed), config, 224) for seed in range(SCENES)]


def test_by_default_the_answer_is_the_only_class_type_present():
    for scene, label in _scenes():
        present = {(o.colour, o.shape) for o in scene.objects} & set(CLS_TYPES)
        assert present == {CLS_TYPES[label]}
        assert 3 <= len(scene.objects) <= 7


def test_with_rivals_the_label_is_the_unique_most_frequent_class_type():
    for scene, label in _scenes(ClsConfig(majority=(2, 3), rivals=(1, 3))):
        counts = Counter((o.colour, o.shape) for o in scene.objects if (o.colour, o.shape) in CLS_TYPES)
        ranked = counts.most_common()
        assert ranked[0][0] == CLS_TYPES[label]
        assert len(ranked) == 1 or ranked[1][1] < ranked[0][1]


def test_other_objects_are_distractors_sharing_the_answers_colour_or_shape():
    saw_distractor = 0
    for scene, label in _scenes():
        colour, shape = CLS_TYPES[label]
        for o in scene.objects:
            if (o.colour, o.shape) not in CLS_TYPES:
                assert o.colour == colour or o.shape == shape
                saw_distractor += 1
    assert saw_distractor > SCENES


def test_object_counts_respect_the_knobs_and_every_class_occurs():
    config = ClsConfig(majority=(3, 3), max_objects=6)
    labels = []
    for scene, label in _scenes(config):
        assert 3 <= len(scene.objects) <= 6
        assert scene.count(*CLS_TYPES[label]) == 3
        labels.append(label)
    assert set(labels) == set(range(len(CLS_TYPES)))


def test_class_objects_are_small():
    fractions = [o.area / 224**2 for scene, label in _scenes()[:50] for o in scene.objects
                 if (o.colour, o.shape) == CLS_TYPES[label]]
    assert max(fractions) <= 0.03


def test_dataset_sample_renders_its_scene_with_its_label():
    data = make_dataset("cls", "val", size=3)
    sample = data[2]
    scene, label = data.scene(2)
    assert sample["label"].dtype == torch.int64 and int(sample["label"]) == label
    assert torch.equal(sample["image"], torch.from_numpy(render(scene).image))

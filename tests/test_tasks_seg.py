"""seg: the label map gives each visible object pixel its shape's class, and 0 elsewhere."""

import torch

from tokensieve.tasks import SEG_CLASSES, SHAPES, make_dataset
from tokensieve.tasks.scenes import render


def test_label_map_marks_each_visible_object_with_its_shape_class():
    data = make_dataset("seg", "val", size=6)
    for i in range(6):
        sample, scene = data[i], data.scene(i)
        labels = sample["mask"].numpy()
        masks = render(scene).masks
        assert sample["mask"].dtype == torch.int64
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert (labels[mask] == 1 + SHAPES.index(obj.shape)).all()
        assert (labels[~masks.any(0)] == 0).all()
        assert labels.max() < len(SEG_CLASSES)


def test_every_shape_class_appears_over_a_few_images():
    data = make_dataset("seg", "train", size=20)
    seen = set()
    for i in range(20):
        seen |= {o.shape for o in data.scene(i).objects}
    assert seen == set(SHAPES)
    assert min(len(data.scene(i).objects) for i in range(20)) >= 3
    assert max(len(data.scene(i).objects) for i in range(20)) <= 8
    assert SEG_CLASSES[0] == "background"

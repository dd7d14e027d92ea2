"""tos: each sentence names exactly its targets, read back by a parser written apart from the
generator; every image serves several different targets."""

import re

import numpy as np
import pytest
import torch

from tokensieve.tasks import COLOUR_NAMES, SHAPES, TosImages, make_dataset
from tokensieve.tasks.scenes import render

IMAGES = 60
MARGIN = 0.06 * 224
# the documented purpose table, written out again on purpose
PURPOSE_SHAPES = {
    "that rolls": {"circle", "ring"},
    "to stack": {"square"},
    "sign that points the way": {"triangle"},
    "that twinkles in the sky": {"star"},
    "sign for first aid": {"cross"},
    "to hang on a hook": {"ring"},
    "with sharp corners": {"square", "triangle", "star", "cross"},
}


def _matching(scene, description: str) -> set[int]:
    """Objects fitting 'red star', 'star', 'red shape' or 'shape'."""
    words = description.split()
    colour = words[0] if words[0] in COLOUR_NAMES else None
    shape = words[-1] if words[-1] in SHAPES else None
    return {i for i, o in enumerate(scene.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)}


def _along(relation: str, subject, anchor) -> float:
    dx, dy = subject.center[0] - anchor.center[0], subject.center[1] - anchor.center[1]
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def _expected_targets(scene, text: str) -> set[int]:
    relation = re.fullmatch(r"the (.+) (left of|right of|above|below) the (\w+ \w+)", text)
    if relation:
        description, way, anchor_words = relation.groups()
        (anchor,) = _matching(scene, anchor_words)  # the anchor is unique
        candidates = _matching(scene, description) - {anchor}
        offsets = {i: _along(way, scene.objects[i], scene.objects[anchor]) for i in candidates}
        assert len(candidates) >= 2 and all(abs(d) >= MARGIN for d in offsets.values()), text
        return {i for i, d in offsets.items() if d >= MARGIN}
    if text.startswith("every "):
        return _matching(scene, text.removeprefix("every "))
    for phrase, shapes in PURPOSE_SHAPES.items():
        if text.endswith(phrase):
            colours = set(text.split()) & set(COLOUR_NAMES)
            return {i for i, o in enumerate(scene.objects)
                    if o.shape in shapes and (not colours or o.colour in colours)}
    found = _matching(scene, text.removeprefix("the "))
    assert len(found) == 1, text
    return found


def test_every_query_selects_exactly_the_objects_its_sentence_names():
    data = make_dataset("tos", "train", size=IMAGES * 4)
    families = set()
    for image in range(IMAGES):
        scene, queries = data.scene(image)
        for query in queries:
            families.add(query.family)
            assert set(query.targets) == _expected_targets(scene, query.text), query.text
    assert families == {"attribute", "every", "relation", "purpose"}


def test_each_image_appears_with_several_different_targets():
    data = make_dataset("tos", "val", size=IMAGES * 4)
    for image in range(IMAGES):
        queries = data.scene(image)[1]
        assert len(queries) == 4
        assert len({q.targets for q in queries}) == 4
        assert len({q.text for q in queries}) == 4


def test_relation_queries_are_common_enough_to_train_on():
    data = make_dataset("tos", "train", size=IMAGES * 4)
    kinds = [q.family for image in range(IMAGES) for q in data.scene(image)[1]]
    assert kinds.count("relation") >= 0.1 * len(kinds)


def test_mask_is_the_union_of_the_targets_visible_masks():
    data = make_dataset("tos", "val", size=8)
    for index in range(8):
        sample = data[index]
        scene, queries = data.scene(index // 4)
        masks = render(scene).masks
        expected = np.any(masks[list(queries[index % 4].targets)], axis=0)
        assert sample["mask"].dtype == torch.bool and sample["mask"].any()
        assert np.array_equal(sample["mask"].numpy(), expected)
        assert sample["text"] == queries[index % 4].text and sample["image_index"] == index // 4


def test_queries_of_one_image_share_the_same_image():
    data = make_dataset("tos", "val", size=8)
    assert torch.equal(data[4]["image"], data[7]["image"])
    assert not torch.equal(data[3]["image"], data[4]["image"])


def test_attribute_map_names_each_visible_objects_colour_and_shape():
    data = make_dataset("tos", "val", size=8)
    sample = data[0]
    scene, _ = data.scene(0)
    rendering = render(scene)
    labels = sample["attributes"].numpy()
    assert labels.dtype == np.uint8 and labels.shape == sample["mask"].shape
    assert np.array_equal(labels == 0, rendering.instances == -1)  # 0 exactly on background
    for index, obj in enumerate(scene.objects):
        visible = rendering.instances == index
        expected = 1 + COLOUR_NAMES.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
        assert (labels[visible] == expected).all()
    assert sample["mask"].numpy()[labels == 0].sum() == 0  # targets are objects, never background


def test_tos_images_render_each_image_once_with_all_its_sentences():
    queries = make_dataset("tos", "val", size=8)
    images = TosImages(queries)
    assert len(images) == 2
    item = images[1]
    assert item["image_index"] == 1 and len(item["texts"]) == 4 and item["masks"].shape == (4, 224, 224)
    for q in range(4):
        sample = queries[4 + q]
        assert torch.equal(item["image"], sample["image"]) and item["texts"][q] == sample["text"]
        assert torch.equal(item["masks"][q], sample["mask"]) and item["families"][q] == sample["family"]
    assert torch.equal(item["attributes"], queries[4]["attributes"])
    with pytest.raises(IndexError, match="out of range"):
        images[2]

"""Caption matching: true samples pair an image with its own caption, false ones with another
scene's, half and half, repeatably."""

import torch

from tokensieve.tasks import make_dataset
from tokensieve.tasks.matching import MatchingDataset


def test_true_samples_carry_the_images_own_caption_and_false_ones_another_scenes():
    data = MatchingDataset("val", size=12, image_size=64)
    scenes = make_dataset("retrieval", "val", size=6, image_size=64)
    labels = []
    for index in range(12):
        sample = data[index]
        image_index = index // 2
        own = scenes[image_index]
        assert torch.equal(sample["image"], own["image"])
        labels.append(int(sample["label"]))
        if index % 2 == 0:
            assert sample["text"] == own["text"]
        else:
            other = data.negative_of(image_index)
            assert other != image_index and sample["text"] == scenes[other]["text"]
    assert labels == [1, 0] * 6


def test_matching_samples_are_the_same_on_every_read():
    first = MatchingDataset("train", size=4, image_size=64)
    again = MatchingDataset("train", size=4, image_size=64)
    for index in range(4):
        assert first[index]["text"] == again[index]["text"]
        assert torch.equal(first[index]["tokens"], again[index]["tokens"])

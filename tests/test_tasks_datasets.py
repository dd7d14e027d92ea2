"""Every task's dataset: deterministic per (split, index), splits disjoint, batches well formed."""

import hashlib

import pytest
import torch

from tokensieve.tasks import (
    DEFAULT_SIZES,
    TASKS,
    VOCABULARY,
    ClsConfig,
    collate,
    make_dataset,
    retrieval_gallery,
    tokenize,
)
from tokensieve.tasks.language import PAD_ID, UNKNOWN_ID, split_words

TEXT_TASKS = ("tos", "nlvr", "retrieval")


def _digest(sample: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(sample):
        value = sample[key]
        digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()


@pytest.mark.parametrize("task", TASKS)
def test_same_index_gives_the_same_bytes_and_other_indices_differ(task):
    data = make_dataset(task, "val", size=8)
    again = make_dataset(task, "val", size=8)
    assert _digest(data[3]) == _digest(again[3])
    assert _digest(data[3]) != _digest(data[4])


@pytest.mark.parametrize("task", TASKS)
def test_splits_share_no_image(task):
    images = {}
    for split in ("train", "val", "test"):
        data = make_dataset(task, split, size=12)
        images[split] = {hashlib.sha256(data[i]["image"].numpy().tobytes()).hexdigest() for i in range(12)}
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


@pytest.mark.parametrize("task", TASKS)
def test_samples_have_documented_types_at_either_image_size(task):
    for image_size in (224, 256):
        sample = make_dataset(task, "test", size=4, image_size=image_size)[1]
        image = sample["image"]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        if "mask" in sample:
            assert sample["mask"].shape == (image_size, image_size)
        if task in TEXT_TASKS:
            assert torch.equal(sample["tokens"], tokenize(sample["text"]))


@pytest.mark.parametrize("task", TASKS)
def test_default_lengths_and_index_errors(task):
    data = make_dataset(task, "val")
    assert len(data) == DEFAULT_SIZES[task]["val"]
    with pytest.raises(IndexError):
        data[len(data)]
    with pytest.raises(IndexError):
        data[-1]


def test_bad_arguments_are_refused_with_the_fix_named():
    with pytest.raises(ValueError, match="choose one of"):
        make_dataset("detection")
    with pytest.raises(ValueError, match="train, val, test"):
        make_dataset("cls", "validation")
    with pytest.raises(ValueError, match="majority"):
        ClsConfig(majority=(3, 9))


def test_collate_pads_word_ids_and_stacks_the_rest():
    data = make_dataset("retrieval", "val", size=4)
    batch = collate([data[i] for i in range(4)])
    longest = max(len(tokenize(t)) for t in batch["text"])
    assert batch["tokens"].shape == (4, longest) and batch["image"].shape == (4, 3, 224, 224)
    assert torch.equal(batch["attention_mask"], batch["tokens"] != PAD_ID)
    assert batch["attention_mask"].sum(1).tolist() == [len(tokenize(t)) for t in batch["text"]]
    assert batch["image_index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_every_sentence_is_made_of_vocabulary_words(task):
    data = make_dataset(task, "train", size=60)
    if task == "tos":
        texts = [query.text for image in range(data.image_count()) for query in data.scene(image)[1]]
    else:
        texts = [data.scene(i)[1].text for i in range(len(data))]
    for text in texts:
        assert UNKNOWN_ID not in tokenize(text).tolist(), text
        assert all(word in VOCABULARY for word in split_words(text))


def test_retrieval_gallery_pairs_image_i_with_caption_i():
    images, captions = retrieval_gallery("val", count=3)
    data = make_dataset("retrieval", "val")
    assert images.shape == (3, 3, 224, 224) and len(captions) == 3
    assert torch.equal(images[2], data[2]["image"]) and captions[2] == data[2]["text"]

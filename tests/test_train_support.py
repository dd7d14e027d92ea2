"""Builders shared by the tests of tokensieve.train (no tests here): a tiny timm ViT, random and
easy synthetic data, and a quiet TrainConfig."""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import tokensieve as ts
from tokensieve.train import TrainConfig

IMAGE, PATCH, CLASSES = 32, 8, 4
PATCHES = (IMAGE // PATCH) ** 2
DYNAMICVIT = ts.DynamicViT(keep=0.7, layers=(1, 2))  # stage targets 0.7 and 0.49
EVIT = ts.EViT(keep=0.5, layers=(1, 2))


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    """A 4-block, width-32 ViT on 32x32 images (16 patches + CLS), random weights."""
    torch.manual_seed(seed)
    settings = dict(pretrained=False, img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=4, num_heads=2,
                    num_classes=CLASSES)
    return timm.create_model("vit_tiny_patch16_224", **{**settings, **overrides})


def patched_model(method: ts.Method = DYNAMICVIT, seed: int = 0, method_seed: int | None = None,
                  **overrides) -> nn.Module:
    """tiny_model patched with `method`; the method's own weights come from `method_seed`."""
    model = tiny_model(seed, **overrides)
    if method_seed is not None:
        torch.manual_seed(method_seed)
    ts.patch(model, method)
    return model


def random_dataset(samples: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 3, IMAGE, IMAGE, generator=generator)
    return TensorDataset(images, torch.randint(0, CLASSES, (samples,), generator=generator))


def easy_dataset(samples: int = 256, seed: int = 0) -> TensorDataset:
    """Faint noise and one bright patch-sized square whose colour is the class (class 3: white),
    at a random patch position: a few tokens decide the answer."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(samples, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    cells = torch.randint(0, PATCHES, (samples,), generator=generator)
    side = IMAGE // PATCH
    for image, label, cell in zip(images, labels.tolist(), cells.tolist(), strict=True):
        row, col = divmod(cell, side)
        square = image[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]
        square[:] = -1.0
        if label == 3:
            square[:] = 2.0
        else:
            square[label] = 2.0
    return TensorDataset(images, labels)


def quiet_config(**settings) -> TrainConfig:
    """A TrainConfig without a progress bar, small batches, and a few steps by default."""
    defaults = dict(steps=4, batch_size=8, lr=1e-3, progress=False)
    return TrainConfig(**{**defaults, **settings})


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The host's and the Sieve's tensors, prefixed as in a checkpoint."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"sieve.{k}": v.clone() for k, v in ts.sieve_of(model).state_dict().items()})
    return state

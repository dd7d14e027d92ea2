"""A patched forward does per block only the work its mode needs: inference asks the blocks nothing
about transformers' checkpointing, a forward outside activation checkpointing keeps nothing for a
rerun, and a dense block with gradients recorded copies the grid once."""

import pytest
import torch
from models import PATCHES, hf_model, images, timm_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tokensieve as ts


def _attributes_missed(monkeypatch) -> list[str]:
    """The names looked up on any module and not found as ordinary attributes (nn.Module.__getattr__,
    which raises and catches an AttributeError for each)."""
    missed: list[str] = []
    own = nn.Module.__getattr__

    def recording(module, name):
        missed.append(name)
        return own(module, name)

    monkeypatch.setattr(nn.Module, "__getattr__", recording)
    return missed


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_timm_forward_never_asks_its_blocks_for_transformers_checkpointing(monkeypatch, mode):
    model = getattr(timm_model("timm-vit"), mode)()
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    missed = _attributes_missed(monkeypatch)
    with torch.no_grad():
        model(images(2))
    model(images(2))
    assert "gradient_checkpointing" not in missed


@pytest.mark.parametrize("method", [
    pytest.param(ts.TopK(keep=0.5, layers=(1, 2)), id="topk"),
    pytest.param(ts.DynamicViT(keep=0.5, layers=(1, 2)), id="dynamicvit"),
])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_a_forward_outside_activation_checkpointing_keeps_nothing_for_a_rerun(method, dense):
    model = timm_model("timm-vit").train()
    sieve = ts.patch(model, method, dense=dense)
    out = model(images(2))  # training without checkpointing: gradients recorded, no block runs again
    assert sieve.runner._starts == {}
    out.sum().backward()


def test_a_transformers_forward_outside_activation_checkpointing_keeps_nothing_for_a_rerun():
    model = hf_model("ViTModel").train()
    sieve = ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    out = model(pixel_values=images(2)).last_hidden_state
    assert sieve.runner._starts == {}
    out.sum().backward()


def test_a_checkpointed_forward_keeps_how_each_block_began_until_the_backward_pass():
    model = timm_model("timm-vit").train()
    model.set_grad_checkpointing(True)
    sieve = ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    out = model(images(2))
    assert {layer for layer, _ in sieve.runner._starts} == set(range(len(model.blocks)))
    out.sum().backward()


class _GridCopies(TorchDispatchMode):
    """Counts the operations that make a new tensor of the grid's shape [B, N0 + 1, C] from another:
    clones, and scatters that are not in place."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.copies = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copying = func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.scatter)
        if copying and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.copies += 1
        return out


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_a_dense_block_copies_the_grid_once(grad):
    model = timm_model("timm-vit").train()
    ts.patch(model, ts.TopK(keep=1.0, layers=(1, 2)), dense=True)  # no write-back at a pruning step
    x = images(2)
    counter = _GridCopies((2, PATCHES + 2, model.embed_dim))  # the class token, the patches, the sink row
    with torch.set_grad_enabled(grad), counter:
        model.forward_features(x)
    # Each block before the last returns a new grid; the last writes its tokens into the grid, which
    # makes a new tensor only when autograd records the write.
    assert counter.copies == len(model.blocks) - 1 + grad

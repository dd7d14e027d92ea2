"""Calling a host's sub-modules without the calls that would change nothing.

At batch 1 on a CPU a block spends a visible share of its time in fixed per-call costs, which do
not shrink with the token count. A pruned forward is faster than its host's own only by the work
it removes, so the views skip the sub-modules that are no-ops in the current mode (identities;
dropout and drop-path in eval mode or at rate 0) and, when no gradient is recorded, apply GELU
in place. Inside `prepacked(model)` they also run the model's linear layers on a copy of their
weight that oneDNN has laid out for its matrix product once, instead of on every call. A sub-module
with hooks, or any global module hook, is always called: whoever registered it sees every call the
host's forward would make.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module


def skippable(module: nn.Module) -> bool:
    """Whether calling `module` now returns its input unchanged, with nobody observing the call."""
    if module._forward_hooks or module._forward_pre_hooks or _global_hooks():
        return False
    if type(module) is nn.Identity:
        return True
    name = type(module).__name__
    if name == "Dropout" or name.endswith("DropPath"):  # torch's; timm's, transformers' Dinov2DropPath
        rate = getattr(module, "p", getattr(module, "drop_prob", None))
        return rate is not None and (not module.training or rate == 0.0)
    return False


def apply(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    """`x` through `modules` in order, skipping those that would change nothing."""
    for module in modules:
        if not skippable(module):
            x = module(x)
    return x


def activate(activation: nn.Module, x: Tensor) -> Tensor:
    """`activation(x)`, computed in x's own storage when that is safe: a hookless GELU (torch's, or
    transformers' GELUActivation over torch's gelu) while no gradient is recorded, which saves
    writing a new [tokens, hidden] buffer. `x` must be a fresh tensor that no one else reads."""
    approximate = _gelu_mode(activation)
    if (approximate is not None and not torch.is_grad_enabled() and not activation._forward_hooks
            and not activation._forward_pre_hooks and not _global_hooks()):
        return torch.ops.aten.gelu_(x, approximate=approximate)
    return activation(x)


def mlp(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` for a plain linear -> activation -> linear MLP (timm's Mlp, with its dropouts and
    norm; transformers' ViT, DeiT, DINOv2, CLIP, BLIP and SAM MLPs), run piece by piece so the
    activation can run in place and idle dropouts are skipped; any other MLP, or one with hooks,
    runs whole."""
    names = _PLAIN_MLPS.get(type(module).__name__)
    if names is None or module._forward_hooks or module._forward_pre_hooks:
        return module(x)
    first, activation, second = (getattr(module, name) for name in names)
    hidden = activate(activation, linear(first, x))
    hidden = apply([getattr(module, name) for name in ("drop1", "norm") if hasattr(module, name)], hidden)
    out = linear(second, hidden)
    return apply((module.drop2,), out) if hasattr(module, "drop2") else out


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`; inside `prepacked` over its model, for a hookless fp32 `nn.Linear` on a CPU while
    no gradient is recorded, computed on a prepacked copy of its weight (the same product, summed in
    another order: ~1e-6 apart)."""
    if not _packable(module, x):
        return module(x)
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(module, x), module.bias, "none", [], "")


@contextlib.contextmanager
def prepacked(*models: nn.Module) -> Iterator[None]:
    """Run the linear layers of the patched `models` on copies of their weights laid out once for
    oneDNN's matrix product, inside the block (CPU, fp32, no gradient recorded; other calls take the
    plain path). At batch 1 this saves the layout work every call otherwise repeats.

    The contract: inside the block, weights change only in ways their version counter sees (an
    in-place op on the parameter, `load_state_dict`, a new parameter), which rebuild the copy.
    A change through `.data` (`p.data.mul_(...)`, the EMA idiom) cannot be seen cheaply and would
    be served stale: make such changes outside the block. Leaving the block drops the copies (one
    weight's memory per layer). Blocks nest; weights made inside `torch.inference_mode()` have no
    version counter and always take the plain path.
    """
    linears = [m for model in models for m in model.modules() if type(m) is nn.Linear]
    with _PREPACKED_LOCK:
        for layer in linears:
            blocks = _PREPACKED.get(layer, 0)
            if not blocks:  # a copy left by a call still running as the last block closed is stale
                _PACKED.pop(layer, None)
            _PREPACKED[layer] = blocks + 1
    try:
        yield
    finally:
        with _PREPACKED_LOCK:
            for layer in linears:
                blocks = _PREPACKED.pop(layer, 1) - 1
                if blocks:
                    _PREPACKED[layer] = blocks
                else:
                    _PACKED.pop(layer, None)


def _packable(module: nn.Module, x: Tensor) -> bool:
    return (_HAS_PACKED_LINEAR and module in _PREPACKED and type(module) is nn.Linear
            and "forward" not in vars(module) and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and module.weight.dtype == torch.float32 and x.dim() >= 2
            and x.is_contiguous() and not module.weight.is_inference()
            and not module._forward_hooks and not module._forward_pre_hooks and not _global_hooks())


def _packed_weight(module: nn.Linear, x: Tensor) -> Tensor:
    weight = module.weight
    cached = _PACKED.get(module)
    # the tensor itself (a freed weight's address is soon reused), its storage and its version
    if cached is None or cached[0]() is not weight or cached[1] != (weight.data_ptr(), weight._version):
        rows = x.numel() // x.shape[-1]  # a layout hint only: the packed weight serves any row count
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        cached = (weakref.ref(weight), (weight.data_ptr(), weight._version), packed)
        _PACKED[module] = cached
    return cached[2]


_HAS_PACKED_LINEAR = (torch.backends.mkldnn.is_available()
                      and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                      and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# module -> (its weight, that weight's address and version when packed, the packed copy)
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
# linear layer -> how many open `prepacked` blocks cover it
_PREPACKED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_PREPACKED_LOCK = threading.Lock()

# class name -> its first linear, activation and second linear attributes
_HF_MLP = ("fc1", "activation_fn", "fc2")
_PLAIN_MLPS = {"Mlp": ("fc1", "act", "fc2"), "ViTMLP": _HF_MLP, "DeiTMLP": _HF_MLP, "Dinov2MLP": _HF_MLP,
               "Dinov2WithRegistersMLP": _HF_MLP, "BlipMLP": _HF_MLP, "CLIPMLP": _HF_MLP,
               "SamMLPBlock": ("lin1", "act", "lin2")}


def _gelu_mode(activation: nn.Module) -> str | None:
    """The `approximate` argument with which torch's in-place gelu_ gives `activation`'s result,
    or None when it is not such a GELU (a swapped-in forward, e.g. a hub kernel, is not)."""
    cls = type(activation)
    if cls is nn.GELU:
        return activation.approximate
    if (cls.__name__ == "GELUActivation" and cls.forward.__module__ == "transformers.activations"
            and "forward" not in vars(activation) and getattr(activation, "act", None) is F.gelu):
        return "none"
    return None


def _global_hooks() -> bool:
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


__all__ = ["activate", "apply", "linear", "mlp", "prepacked", "skippable"]

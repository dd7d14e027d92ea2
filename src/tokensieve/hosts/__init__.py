"""One file per model family: how to read its blocks. No method logic here."""

from __future__ import annotations

from torch import nn

from tokensieve.hosts import hf_blip, hf_blip_text, hf_clip, hf_clip_text, hf_sam, hf_vit, timm_vit
from tokensieve.hosts.base import (
    BlockCall,
    BlockView,
    CrossAttentionView,
    Host,
    PositionalAttention,
    runs_own_attention,
)

_FAMILIES = (timm_vit, hf_vit, hf_clip, hf_blip, hf_clip_text, hf_blip_text, hf_sam)


def resolve_host(model: nn.Module) -> Host:
    """The Host for `model`, or a TypeError naming the supported families and, for a wrapper or
    a model made of supported towers, the module to patch instead."""
    for family in _FAMILIES:
        if family.matches(model):
            return family.resolve(model)
    raise TypeError(_refusal(model))


# Wrappers whose forward runs the model they hold (recognised by class name, nothing imported):
# why the wrapper itself cannot be patched, and what to do with the model once patched.
_WRAPPERS = {
    "OptimizedModule": (
        "a torch.compile wrapper",
        "and call the wrapper as before (it compiles the patched blocks anew)"),
    "DataParallel": (
        "a DataParallel wrapper, whose per-device replicas would call the original's patched blocks, "
        "with its weights on its device",
        "and call it directly; for several devices, run one process per device (tokensieve.train.fit "
        "averages the gradients over them)"),
    "DistributedDataParallel": (
        "a DistributedDataParallel wrapper",
        "before wrapping it; DDP does not see the method's own parameters, which live on the handle patch "
        "returns, so average their gradients too (tokensieve.train.fit does)"),
}


def _refusal(model: nn.Module) -> str:
    cls = type(model)
    inside = _patchable_modules(model)
    wrapper = _WRAPPERS.get(cls.__name__)
    if wrapper is not None and len(inside) == 1:
        what, then = wrapper
        return (f"tokensieve cannot patch {what}; patch the model it holds, "
                f"ts.patch(model.{inside[0]}, method), {then}")
    supported = "; ".join(f.FAMILY for f in _FAMILIES)
    message = f"tokensieve cannot patch {cls.__module__}.{cls.__name__}. Supported: {supported}"
    if len(inside) == 1:
        return f"{message}. It holds a model tokensieve can patch: ts.patch(model.{inside[0]}, method)"
    if inside:
        towers = ", ".join(f"model.{name}" for name in inside)
        return (f"{message}. It holds models tokensieve can patch: patch them together with "
                f"ts.patch([{towers}], method) (one handle over all of them), or any one alone")
    return message


def _patchable_modules(model: nn.Module) -> list[str]:
    """Paths of the outermost modules inside `model` that a family matches."""
    found: list[str] = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(f"{outer}.") for outer in found) and any(
                family.matches(module) for family in _FAMILIES):
            found.append(name)
    return found


__all__ = ["BlockCall", "BlockView", "CrossAttentionView", "Host", "PositionalAttention", "resolve_host",
           "runs_own_attention"]

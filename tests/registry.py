"""Every method of the library, one line each: the configurations the promise tests run.

The promise tests (pruning off equals the host, ragged batch equals each image alone, no state
between calls, unpatch restores the model, FLOPs agree with torch's counter, deep copies and state
dicts) take their methods from here, so a registered method is held to every promise it supports.
test_registry.py fails for a method that tokensieve exports but REGISTRY does not list.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from models import HF_CLASSES, TIMM_HOSTS
from torch import nn

import tokensieve as ts
from tokensieve import MADTP, VLTP, DynamicViT, EViT, Method, RandomDrop, SViT, ToMe, TopK
from tokensieve.patch import patched_within

VARIANTS = ("pruned", "off", "ragged")


@dataclass(frozen=True)
class Entry:
    """A method: a config that prunes, the same config with pruning off, and what it asks of a host."""

    name: str  # the test id
    pruned: Method  # prunes on the small hosts of models.py (4 blocks, 64 patches)
    off: Method  # the same config with pruning off (keep every token, merge none): the host's output
    ragged: Method | None = None  # the variant whose images keep their own token counts, if any
    class_attention: bool = False  # scores by class attention: needs a class token
    fuses: bool = False  # makes tokens of no single input position (fused, merged); merged ones (which do
    # not keep positions) not on positional hosts, fused ones sit at a causal text's end
    equal_counts: bool = False  # pruned and off need equal counts per image: not on padded batches
    overhead: bool = True  # spends MACs outside the host's own layers (scores, matching), as FLOPs count
    map_only: bool = False  # rates the cells of an image map: SAM's encoder only
    batch_dependent: bool = False  # pruned keeps the batch's largest count: a sample depends on its batch


@dataclass(frozen=True)
class Host:
    """What a host (with its inputs) asks of a method."""

    class_token: bool = True  # has a class token to score by
    positional: bool = False  # reads its output by input position (dense only), or attends causally
    padded: bool = False  # its batch carries padding (padded texts)
    mean_pooled: bool = False  # its head averages the tokens, so padding of a ragged batch is refused
    image_map: bool = False  # its blocks take an image map (SAM's encoder)

    def runs(self, entry: Entry, variant: str = "pruned") -> bool:
        """Whether this host runs `entry`'s `variant` ("pruned", "off" or "ragged")."""
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: use one of {VARIANTS}")
        if variant == "ragged" and (entry.ragged is None or self.mean_pooled):
            return False
        if variant == "pruned" and entry.batch_dependent and self.padded:
            return False  # a short text's count is set by the longest: it would not equal itself alone
        if variant != "ragged" and entry.equal_counts and self.padded:
            return False
        if entry.map_only and not self.image_map:
            return False
        merges = entry.fuses and not entry.pruned.keeps_positions
        return not (entry.class_attention and not self.class_token) and not (merges and self.positional)


KEEP_ALL = {"keep": 1.0}  # pruning off, for methods with a keep share


def _entry(name: str, pruned: Method, off: dict[str, Any] = KEEP_ALL, ragged: dict[str, Any] | None = None,
           **flags: bool) -> Entry:
    """`off` and `ragged` name only the settings that differ from `pruned`; pruning off is keep=1.0
    unless `off` says otherwise."""
    ragged_method = None if ragged is None else dataclasses.replace(pruned, **ragged)
    return Entry(name, pruned, dataclasses.replace(pruned, **off), ragged_method, **flags)


L = (1, 2)  # pruning layers of the 4-block hosts
GUIDANCE_WIDTH = 12  # of the guidance a guided method reads per call

REGISTRY: tuple[Entry, ...] = (
    _entry("topk", TopK(keep=0.5, layers=L), ragged={"mass": 0.6}, class_attention=True),
    _entry("evit", EViT(keep=0.5, layers=L), class_attention=True, fuses=True),
    _entry("evit-nofuse", EViT(keep=0.5, layers=L, fuse=False), class_attention=True),
    _entry("dynamicvit", DynamicViT(keep=0.5, layers=L), ragged={"dynamic": True}, equal_counts=True),
    _entry("tome", ToMe(r=4), off={"r": 0}, fuses=True, equal_counts=True),
    _entry("randomdrop", RandomDrop(keep=0.5, layers=L), overhead=False),
    _entry("svit", SViT(keep=0.5, layers=L, per_image=True), ragged={"per_image": False}),
    _entry("svit-dither", SViT(keep=0.5, layers=L, per_image=True, dither=True), ragged={"per_image": False}),
    # the paper's "discard": dropped tokens leave the dense map (their own finish step)
    _entry("svit-discard", SViT(keep=0.5, layers=L, per_image=True, preserve=False),
           ragged={"per_image": False}),
    _entry("dynamicvit-discard", DynamicViT(keep=0.5, layers=L, preserve=False), ragged={"dynamic": True},
           equal_counts=True),
    # guided by a per-call embedding (`given`); its stages before SAM's blocks 1 and 2
    _entry("vltp", VLTP(keep=0.5, layers=L, guidance_width=GUIDANCE_WIDTH, width=16, heads=2),
           ragged={"by_threshold": True}, map_only=True),
    # alignment tokens shared by the towers patched together; every layer prunes and merges
    # (pruned: the authors' batch count, the largest of the batch; ragged: each sample's own)
    _entry("madtp", MADTP(temperature=16.0, batch_max=True), off={"temperature": 0.0},
           ragged={"batch_max": False}, class_attention=True, fuses=True, batch_dependent=True),
)

# What each host of models.py asks (the timm and transformers image towers), and the other families.
MEAN_POOLED = ("timm-reg-gap", "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
HOSTS: dict[str, Host] = {name: Host(mean_pooled=name in MEAN_POOLED) for name in [*TIMM_HOSTS, *HF_CLASSES]}
VISION = Host()  # a class-token image tower read by its class token
SAM = Host(class_token=False, positional=True, image_map=True)  # no class token, its neck reads a map
CLIP_TEXT = Host(positional=True)  # causal, pooled at each text's end token, returned by position
BLIP_TEXT = Host()


def entries(variant: str = "pruned", host: Host = VISION) -> list[Entry]:
    """The entries whose `variant` `host` runs."""
    return [entry for entry in REGISTRY if host.runs(entry, variant)]


def _id(entry: Entry, variant: str, variants: tuple[str, ...]) -> str:
    return f"{entry.name}-{variant}" if variant == "ragged" and len(variants) > 1 else entry.name


def methods(*variants: str, host: Host = VISION) -> list:
    """pytest params: the `variants` (default "pruned") of every entry `host` runs, by entry name
    (a ragged variant among others as "<name>-ragged")."""
    variants = variants or ("pruned",)
    return [pytest.param(getattr(entry, variant), id=_id(entry, variant, variants))
            for variant in variants for entry in entries(variant, host)]


def host_methods(hosts: Iterable[str], *variants: str) -> list:
    """pytest params (host, method): each of the models.py `hosts` with every method it runs, as
    `methods` gives them, by "<host>-<method id>"."""
    return [pytest.param(host, *param.values, id=f"{host}-{param.id}")
            for host in hosts for param in methods(*variants, host=HOSTS[host])]


@contextlib.contextmanager
def given(model: nn.Module, batch: int, seed: int = 0) -> Iterator[None]:
    """Inside the block, every call of `model` (patched) gets the per-call inputs its method
    requires, made up for `batch` samples: seeded random rows of each input's width."""
    sieve = patched_within(model)[1]
    generator = torch.Generator().manual_seed(seed)
    tensors = {spec.name: torch.randn(batch, spec.width or GUIDANCE_WIDTH, generator=generator)
               for spec in sieve.method.call_inputs(sieve.spec) if spec.required}
    if not tensors:
        yield
        return
    with ts.inputs(model, **tensors):
        yield

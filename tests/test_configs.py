"""A method's config is read when the method is made: every field in the one type the method works
with, and anything else refused with an error that says what to write. Bools are not numbers, numpy
scalars are, and a string is never split into items."""

import dataclasses

import numpy as np
import pytest
from registry import REGISTRY

import tokensieve as ts
from tokensieve.loading import parse_method

CLASSES = sorted({type(entry.pruned) for entry in REGISTRY}, key=lambda cls: cls.__name__)

# Per field name: values refused, with the error type. Every field of every registered method is here.
REFUSED = {
    "keep": [(True, TypeError), ("0.5", TypeError), (None, TypeError), (0, ValueError), (1.5, ValueError),
             (float("nan"), ValueError)],
    "mass": [(True, TypeError), ("0.9", TypeError), (0.0, ValueError), (2, ValueError)],
    "layers": [(("1",), TypeError), ((1.5,), TypeError), ((True,), TypeError), (1, TypeError),
               ("36", TypeError), ("3,6", TypeError), (3.0, TypeError), (np.array(3), TypeError),
               ((-1,), ValueError), ((2, -1), ValueError)],
    "fuse": [(1, TypeError), ("False", TypeError), (None, TypeError)],
    "dynamic": [(0, TypeError), ("yes", TypeError)],
    "seed": [(True, TypeError), (1.5, TypeError), ("3", TypeError)],
    "r": [("13", TypeError), (2.5, TypeError), (True, TypeError), ([1, "2"], TypeError),
          ([1, 2.5], TypeError), ((8, "x"), TypeError), ((8, 0.5, 1), ValueError), (-1, ValueError),
          ([2, -1], ValueError), ((8, float("inf")), ValueError)],
    "per_image": [(1, TypeError), ("True", TypeError), (None, TypeError)],
    "reactivate": [(0, TypeError), ("no", TypeError)],
    "preserve": [(1.0, TypeError), ("False", TypeError)],
    "sampled": [(1, TypeError), ("yes", TypeError), (None, TypeError)],
    "dither": [(1, TypeError), ("True", TypeError), (None, TypeError)],
    "gate": [(None, TypeError), (2, TypeError), ("MLP", ValueError), ("topk", ValueError)],
    "train_decisions": [(None, TypeError), (True, TypeError), ("threshold", ValueError), ("k", ValueError)],
    "rate_weight": [(True, TypeError), ("4", TypeError), (-1.0, ValueError), (float("inf"), ValueError)],
    "guidance_width": [(0, ValueError), (1.5, TypeError), ("128", TypeError), (True, TypeError)],
    "width": [(1, ValueError), (2.5, TypeError), ("256", TypeError)],
    "heads": [(0, ValueError), ("8", TypeError), (None, TypeError)],
    "decoder_layers": [(0, ValueError), (1.5, TypeError)],
    "shared": [(1, TypeError), ("True", TypeError), (None, TypeError)],
    "relevance_weight": [(True, TypeError), ("1", TypeError), (-1.0, ValueError), (float("inf"), ValueError)],
    "by_threshold": [(1, TypeError), ("True", TypeError), (None, TypeError)],
    "temperature": [(True, TypeError), ("1", TypeError), (-0.5, ValueError), (float("inf"), ValueError)],
    "start_layer": [(-1, ValueError), (1.5, TypeError), ("1", TypeError), (True, TypeError)],
    "alignment_tokens": [(0, ValueError), (1.5, TypeError), ("100", TypeError), (True, TypeError)],
    "alignment_width": [(0, ValueError), (2.5, TypeError), ("768", TypeError)],
    "project": [(1, TypeError), ("True", TypeError), (None, TypeError)],
    "alignment_weight": [(True, TypeError), ("0.1", TypeError), (-1.0, ValueError),
                         (float("nan"), ValueError)],
    "batch_max": [(0, TypeError), ("False", TypeError), (None, TypeError)],
    "aligned": [(1, TypeError), ("yes", TypeError)],
}
REFUSED_CASES = [pytest.param(cls, name, value, error, id=f"{cls.__name__}-{name}={value!r}")
                 for cls in CLASSES for f in dataclasses.fields(cls) if f.name in REFUSED
                 for name in [f.name] for value, error in REFUSED[f.name]]


def test_every_field_of_every_registered_method_has_refused_values_here():
    missing = [f"{cls.__name__}.{f.name}" for cls in CLASSES for f in dataclasses.fields(cls)
               if f.name not in REFUSED]
    assert not missing, f"add the values these fields refuse to REFUSED: {missing}"


@pytest.mark.parametrize(("cls", "name", "value", "error"), REFUSED_CASES)
def test_a_wrong_field_is_refused_when_the_method_is_made_naming_method_and_field(cls, name, value, error):
    with pytest.raises(error) as raised:
        cls(**{name: value})
    assert str(raised.value).startswith(f"{cls.__name__}({name}=")


def test_a_string_schedule_is_never_split_into_per_block_values():
    with pytest.raises(TypeError, match="r=13"):
        ts.ToMe(r="13")


def test_a_single_layer_index_is_refused_naming_the_one_tuple_to_write():
    with pytest.raises(TypeError, match=r"layers=\(3,\)"):
        ts.EViT(layers=3)


@pytest.mark.parametrize("layers", [(-1,), [3, -2]])
def test_a_negative_layer_index_is_refused_when_the_method_is_made(layers):
    with pytest.raises(ValueError, match="count blocks from 0"):
        ts.TopK(layers=layers)


@pytest.mark.parametrize(("layers", "match"), [(np.array(3), r"layers=\(3,\)"),
                                               (np.array(2.5), r"layers=\(3, 6, 9\)")])
def test_a_zero_dimensional_array_of_layers_is_refused_naming_the_tuple_to_write(layers, match):
    with pytest.raises(TypeError, match=match) as raised:
        ts.EViT(layers=layers)
    assert "iteration" not in str(raised.value)


@pytest.mark.parametrize(("made", "expected"), [
    (ts.EViT(layers=[6, 3, 3]), ts.EViT(layers=(3, 6))),
    (ts.TopK(layers=range(1, 3)), ts.TopK(layers=(1, 2))),
    (ts.DynamicViT(layers=np.array([9, 3])), ts.DynamicViT(layers=(3, 9))),
    (ts.RandomDrop(layers=(np.int64(2),), seed=np.int32(7)), ts.RandomDrop(layers=(2,), seed=7)),
    (ts.TopK(keep=1, mass=np.float32(0.5)), ts.TopK(keep=1.0, mass=0.5)),
    (ts.EViT(fuse=np.bool_(False)), ts.EViT(fuse=False)),
    (ts.ToMe(r=np.int64(4), layers=[2, 1]), ts.ToMe(r=4, layers=(1, 2))),
    (ts.ToMe(r=(np.int64(8), -0.5)), ts.ToMe(r=(8, -0.5))),
    (ts.ToMe(r=[np.int64(3), np.int64(2)]), ts.ToMe(r=[3, 2])),
], ids=["list", "range", "numpy-array", "numpy-ints", "int-keep-numpy-mass", "numpy-bool", "tome-numpy-r",
        "tome-inflect", "tome-per-block"])
def test_equal_settings_in_other_types_make_equal_methods_of_plain_types(made, expected):
    assert made == expected and str(made) == str(expected)
    for f in dataclasses.fields(made):
        value = getattr(made, f.name)
        items = value if isinstance(value, (tuple, list)) else [value]
        assert all(type(item) in (int, float, bool, type(None)) for item in items), (f.name, value)
    assert isinstance(made.layers, (tuple, type(None)))


def test_replacing_a_field_reads_it_again():
    with pytest.raises(TypeError, match="layers"):
        dataclasses.replace(ts.EViT(), layers=("1",))
    assert dataclasses.replace(ts.EViT(), layers=[4, 2]).layers == (2, 4)


@pytest.mark.parametrize(("spec", "expected"), [
    ("evit:keep=0.5,layers=(3,6)", ts.EViT(keep=0.5, layers=(3, 6))),
    ("evit:layers=[6,3],fuse=false", ts.EViT(layers=(3, 6), fuse=False)),
    ("topk:keep=1,mass=none", ts.TopK(keep=1.0)),
    ("tome:r=13", ts.ToMe(r=13)),
    ("tome:r=[8,8,4]", ts.ToMe(r=[8, 8, 4])),
    ("tome:r=(8,-0.5)", ts.ToMe(r=(8, -0.5))),
    ("random:keep=0.5,layers=(4,),seed=3", ts.RandomDrop(keep=0.5, layers=(4,), seed=3)),
    ("svit:keep=0.6,gate=dynamicvit,layers=none", ts.SViT(keep=0.6, gate="dynamicvit")),
    ("svit:gate='mlp',per_image=true,layers=(3,4)", ts.SViT(gate="mlp", per_image=True, layers=(3, 4))),
])
def test_method_specs_read_into_the_method(spec, expected):
    assert parse_method(spec) == expected


@pytest.mark.parametrize(("spec", "error", "match"), [
    ('tome:r="13"', TypeError, "r=13"),
    ("tome:r=2.5", TypeError, "whole number"),
    ("evit:layers=3", TypeError, r"layers=\(3,\)"),
    ('evit:layers=("1",)', TypeError, "block indices"),
    ("evit:keep=true", TypeError, "share"),
    ("evit:layers=3;6", ValueError, r"layers=\(3,6\)"),
    ("evit:keep=0.5,keep=0.7", ValueError, "twice"),
    ("svit:gate=topk", ValueError, "'mlp' or 'dynamicvit'"),
    ("svit:rate_weight=heavy", ValueError, "cannot read rate_weight"),
])
def test_method_specs_with_wrong_values_are_refused(spec, error, match):
    with pytest.raises(error, match=match):
        parse_method(spec)

"""The command line: a wrong method, size or file is a usage error (a message and exit code 2, no
traceback); --image-size builds a timm model for that size."""

import json

import pytest
import timm
import torch
from models import host_model

from tokensieve.cli import main
from tokensieve.loading import load_model

TIMM = "deit_tiny_patch16_224"  # 12 blocks, 16-pixel patches
USAGE_ERROR = 2


def run(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tokensieve ARGS`."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_usage_error(result: tuple[int, str, str], *phrases: str) -> None:
    code, _, err = result
    assert code == USAGE_ERROR, err
    assert "Traceback" not in err and "Error:" in err
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.parametrize(("command", "spec", "phrase"), [
    ("flops", "evit:keep=1.5", "(0, 1]"),
    ("flops", "evit:layers=(20,)", "12 blocks"),
    ("flops", 'tome:r="13"', "r=13"),
    ("flops", "tome:r=2.5", "whole number"),
    ("flops", "evit:layers=3", "layers=(3,)"),
    ("flops", "tome:r=200", "lower r"),
    ("bench", "evit:layers=(20,)", "12 blocks"),
    ("bench", "topk:keep=true", "share"),
])
def test_a_bad_method_is_a_usage_error(capsys, command, spec, phrase):
    assert_usage_error(run(capsys, command, TIMM, spec), phrase)


@pytest.mark.parametrize("command", [["eval", "cls", "evit:layers=(40,)", "--samples", "1"],
                                     ["train", "cls", "--method", "evit:layers=(40,)", "--run-dir", "RUN"]],
                         ids=["eval", "train"])
def test_a_method_past_the_reference_models_depth_is_a_usage_error(capsys, tmp_path, command):
    command = [str(tmp_path) if word == "RUN" else word for word in command]
    assert_usage_error(run(capsys, *command), "past this model")


def test_a_model_tokensieve_cannot_patch_is_a_usage_error(capsys):
    assert_usage_error(run(capsys, "flops", "resnet10t", "evit"), "cannot patch", "Supported")


@pytest.mark.parametrize("option", ["--image-size", "--batch"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_size_or_batch_below_one_is_a_usage_error(capsys, option, value):
    assert_usage_error(run(capsys, "flops", TIMM, "topk:keep=0.5", option, value), option)


def test_flops_at_another_image_size_builds_the_timm_model_for_it(capsys):
    code, out, err = run(capsys, "flops", TIMM, "topk:keep=0.5,layers=(3,)", "--image-size", "64", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["image_size"] == 64
    assert payload["results"][0]["layers"][0]["attention_tokens"] == (64 // 16) ** 2 + 1


def test_bench_at_another_image_size_builds_the_timm_model_for_it(capsys):
    code, out, err = run(capsys, "bench", TIMM, "topk:keep=0.5,layers=(3,)", "--image-size", "64",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["image_size"] == 64


def test_a_timm_checkpoint_loads_at_another_image_size_with_its_positions_resampled(tmp_path):
    source = timm.create_model(TIMM, pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = load_model(TIMM, checkpoint=str(path), image_size=64)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.pos_embed.shape == (1, (64 // 16) ** 2 + 1, 192)


@pytest.mark.parametrize(("name", "content"), [
    ("random.pth", bytes(range(256)) * 4),
    ("text.pth", b"hello\n"),
    ("random.safetensors", bytes(range(256)) * 4),
])
def test_a_file_that_is_no_checkpoint_is_a_usage_error_naming_it(capsys, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    result = run(capsys, "flops", TIMM, "topk", "--checkpoint", str(path))
    assert_usage_error(result, "--checkpoint", "is not a checkpoint", name)
    assert "pickle" not in result[2]


def test_a_checkpoint_of_another_model_is_a_usage_error_naming_it(capsys, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model(TIMM, pretrained=False, depth=2).state_dict(), path)
    assert_usage_error(run(capsys, "flops", TIMM, "topk", "--checkpoint", str(path)),
                       "other.pth", "another model")


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """A small transformers ViT classifier (64 px, 8-pixel patches) saved to a directory."""
    directory = tmp_path_factory.mktemp("vit")
    host_model("ViTForImageClassification").save_pretrained(directory)
    return str(directory)


def test_flops_at_another_image_size_interpolates_a_transformers_models_positions(capsys, hf_directory):
    code, out, err = run(capsys, "flops", hf_directory, "topk:keep=0.5,layers=(1,)", "--image-size", "32",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["layers"][0]["attention_tokens"] == (32 // 8) ** 2 + 1


def test_bench_at_another_size_of_a_transformers_model_that_needs_interpolation_is_a_usage_error(
        capsys, hf_directory):
    result = run(capsys, "bench", hf_directory, "topk:keep=0.5,layers=(1,)", "--image-size", "32")
    assert_usage_error(result, "--image-size", "interpolate_pos_encoding")


def test_a_checkpoint_for_a_transformers_directory_is_a_usage_error(capsys, tmp_path, hf_directory):
    path = tmp_path / "weights.pth"
    torch.save({}, path)
    assert_usage_error(run(capsys, "flops", hf_directory, "topk", "--checkpoint", str(path)),
                       "--checkpoint", "holds its own weights")

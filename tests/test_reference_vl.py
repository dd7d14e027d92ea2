"""The vision-language reference models: a small transformers BLIP (ITM head) for nlvr and a small
transformers CLIP for retrieval, trained by their recipes, shipped in fp16, scored by accuracy
and by recall@k both ways."""

import dataclasses
import json
import math

import pytest
import torch
import transformers
from click.testing import CliRunner
from models import sharpen_attention
from safetensors.torch import load_file

import tokensieve as ts
from tokensieve.cli import main as cli
from tokensieve.reference import (
    END_ID,
    RECIPES,
    START_ID,
    Phase,
    Recipe,
    build_nlvr,
    build_retrieval,
    evaluate,
    image_embeddings,
    load_method,
    load_recipe_phase,
    load_reference,
    match_logits,
    patch_reference,
    retrieval_scores,
    save_reference,
    text_embeddings,
    text_encoder,
    text_inputs,
    train_reference,
)
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.recipes import phases as recipe_phases
from tokensieve.reference.recipes.nlvr import phases as nlvr_phases
from tokensieve.reference.vl import MAX_TEXT_TOKENS, VL_VOCABULARY, nlvr_config, retrieval_config
from tokensieve.tasks import (
    PAD_ID,
    VOCABULARY,
    collate,
    make_dataset,
    recall_at_k,
    retrieval_gallery,
    tokenize,
)
from tokensieve.train import contrastive_loss, latest_checkpoint

# Test sizes: width 32, two layers, patches of 32 px (a 7×7 grid at the native 224×224).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   patch_size=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_RECIPE = {task: Recipe(task, (Phase(64, 2, 1e-3, 1), Phase(96, 2, 5e-4, 0)), batch_size=4,
                             attributes=True)
               for task in ("nlvr", "retrieval")}


def tiny(task: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if task == "nlvr":
        return build_nlvr(nlvr_config(vision=TINY_VISION, text=TINY_TEXT, projection=16)).eval()
    return build_retrieval(retrieval_config(vision=TINY_VISION, text=TINY_TEXT, projection=16)).eval()


def _batch(task: str, count: int, size: int = 224) -> dict:
    data = make_dataset(task, "val", size=count, image_size=size)
    batch = collate([data[i] for i in range(count)])
    batch["input_ids"], batch["text_mask"] = text_inputs(batch["tokens"], batch["attention_mask"])
    return batch


def _outputs(task: str, model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        if task == "nlvr":
            return match_logits(model, batch["image"], batch["input_ids"], batch["text_mask"])
        return image_embeddings(model, batch["image"]) @ text_embeddings(model, batch["input_ids"],
                                                                         batch["text_mask"]).t()


# --- text ids ----------------------------------------------------------------------------------

def test_task_words_keep_their_ids_between_a_start_and_an_end_token():
    assert (START_ID, END_ID, VL_VOCABULARY) == (68, 69, 70) and len(VOCABULARY) == START_ID
    words = [tokenize("there is a red star"), tokenize("every circle")]
    batch = collate([{"tokens": w} for w in words])
    ids, mask = text_inputs(batch["tokens"], batch["attention_mask"])
    assert ids.tolist() == [[START_ID, *words[0].tolist(), END_ID],
                            [START_ID, *words[1].tolist(), END_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert mask.dtype == torch.long and mask.tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert torch.equal(text_inputs(batch["tokens"])[0], ids)  # the mask defaults to the non-padding


def test_bad_word_ids_are_named():
    with pytest.raises(ValueError, match="int64 word ids"):
        text_inputs(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 68\)"):
        text_inputs(torch.tensor([[5, START_ID]]))
    with pytest.raises(ValueError, match="right-padded"):
        text_inputs(torch.tensor([[PAD_ID, 5, 6]]), torch.tensor([[False, True, True]]))
    with pytest.raises(ValueError, match="at most"):
        text_inputs(torch.full((1, MAX_TEXT_TOKENS), 5))


# --- the models ----------------------------------------------------------------------------------

def test_the_reference_models_are_a_small_blip_with_cross_attention_and_a_small_clip():
    blip, clip = build_nlvr(), build_retrieval()
    assert isinstance(blip, transformers.BlipForImageTextRetrieval)
    assert isinstance(clip, transformers.CLIPModel)
    for model in (blip, clip):
        vision = model.config.vision_config
        assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
            224, 16, 192, 6)
        assert sum(p.numel() for p in model.parameters()) * 2 < 11e6  # fp16 weights of ~10 MB at most
    assert blip.vision_model.encoder.layers[0].self_attn.qkv.weight.std() > 0.01  # not the 1e-10 default
    text = blip.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (192, 4, VL_VOCABULARY)
    assert all(hasattr(layer, "crossattention") for layer in blip.text_encoder.encoder.layer)
    assert blip.itm_head.out_features == 2
    clip_text = clip.config.text_config
    assert (clip_text.eos_token_id, clip_text.bos_token_id, clip_text.pad_token_id) == (
        END_ID, START_ID, PAD_ID)
    assert clip.text_model.eos_token_id != 2  # not the legacy argmax-of-ids pooling


def test_blip_gives_two_match_logits_and_its_first_token_reads_the_whole_statement():
    model = tiny("nlvr")
    batch = _batch("nlvr", 3)
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], pixel_values=batch["image"],
                       attention_mask=batch["text_mask"])
        assert output.itm_score.shape == (3, 2)
        torch.testing.assert_close(_outputs("nlvr", model, batch), output.itm_score)
        # The text runs bidirectionally: the [ENC] token the ITM head reads sees the last word.
        changed = batch["input_ids"].clone()
        last = int(batch["text_mask"][0].sum()) - 2  # before END_ID
        changed[0, last] = 3 if changed[0, last] != 3 else 4
        other = model(input_ids=changed, pixel_values=batch["image"], attention_mask=batch["text_mask"])
        assert not torch.allclose(other.itm_score[0], output.itm_score[0])
        torch.testing.assert_close(other.itm_score[1:], output.itm_score[1:])


def test_clip_pools_each_caption_at_its_end_token_whatever_the_padding():
    model = tiny("retrieval")
    batch = _batch("retrieval", 3)
    ids, mask = batch["input_ids"], batch["text_mask"]
    with torch.no_grad():
        output = model(input_ids=ids, pixel_values=batch["image"], attention_mask=mask)
        assert output.logits_per_image.shape == (3, 3)
        texts = text_embeddings(model, ids, mask)
        images = image_embeddings(model, batch["image"])
        torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(images @ texts.t() * model.logit_scale.exp(), output.logits_per_image)
        hidden = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ends = mask.sum(dim=1) - 1  # END_ID is the last real token
        assert (ids[torch.arange(3), ends] == END_ID).all()
        expected = torch.nn.functional.normalize(model.text_projection(hidden[torch.arange(3), ends]), dim=-1)
        torch.testing.assert_close(texts, expected)
        padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        torch.testing.assert_close(text_embeddings(model, padded, padded_mask), texts, atol=1e-5, rtol=0)


# --- training and storage ------------------------------------------------------------------------

@pytest.mark.parametrize(("task", "scores"), [
    ("nlvr", {"accuracy"}),
    ("retrieval", {"R@1", "image_to_text@1", "text_to_image@1", "image_to_text@5", "text_to_image@5"}),
])
def test_a_tiny_recipe_trains_by_phases_ships_fp16_and_reloads_to_the_same_outputs(tmp_path, monkeypatch,
                                                                                  task, scores):
    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    before = {name: p.clone() for name, p in tiny(task).named_parameters()}
    model = train_reference(task, tmp_path / "run", tmp_path / "out", recipe=TINY_RECIPE[task],
                            progress=False, model=tiny(task))
    for phase in ("phase-0-64px", "phase-1-96px"):
        log = (tmp_path / "run" / phase / "log.jsonl").read_text()
        lines = [json.loads(line) for line in log.splitlines()]
        assert [line["step"] for line in lines] == [1, 2]
        assert all(math.isfinite(line["loss"]) for line in lines)
        assert set(lines[-1]["eval"]) == scores  # the validation score closes each phase
    trained = dict(model.named_parameters())
    assert not torch.equal(trained["vision_model.embeddings.patch_embedding.weight"],
                           before["vision_model.embeddings.patch_embedding.weight"])
    out = tmp_path / "out"
    stored = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    assert stored < 2 * sum(p.numel() for p in model.state_dict().values()) + 64_000  # fp16, plus header

    loaded = load_reference(task, out)
    assert type(loaded) is type(model) and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    batch = _batch(task, 3)
    expected = _outputs(task, model, batch)
    torch.testing.assert_close(_outputs(task, loaded, batch), expected,
                               atol=0.02 * expected.abs().max().item(), rtol=0.0)


def test_weights_of_another_task_are_refused(tmp_path):
    save_reference(tiny("retrieval"), tmp_path / "clip")
    with pytest.raises(ValueError, match="holds the retrieval reference model, not the nlvr one"):
        load_reference("nlvr", tmp_path / "clip")


def test_the_retrieval_recipe_resizes_progressively_and_nlvr_sees_then_reads():
    phases = RECIPES["retrieval"].phases
    sizes = [phase.image_size for phase in phases]
    assert sizes == sorted(sizes) and sizes[0] == 112 and sizes[-1] == 224
    assert sum(phase.steps for phase in phases[:-1]) > 10 * phases[-1].steps
    # nlvr: the tower at its native size, first on objects, then on being found, then frozen
    # under the statements
    assert [(phase.data, phase.image_size) for phase in RECIPES["nlvr"].phases] == [
        ("objects", 224), ("finding", 224), ("tokens", 224)]


# --- scoring -----------------------------------------------------------------------------------

def test_nlvr_is_scored_by_accuracy_over_the_split_whatever_the_batch_size():
    model = tiny("nlvr")
    data = make_dataset("nlvr", "val", size=6)
    scores = evaluate(model, "nlvr", data, batch_size=4, progress=False)
    assert scores == evaluate(model, "nlvr", data, batch_size=6, progress=False)
    batch = _batch("nlvr", 6)
    predicted = _outputs("nlvr", model, batch).argmax(-1)
    assert scores == {"accuracy": (predicted == batch["label"]).float().mean().item()}
    with pytest.raises(TypeError, match="BlipForImageTextRetrieval"):
        evaluate(tiny("retrieval"), "nlvr", data, progress=False)


def test_retrieval_is_recall_at_1_and_5_both_ways_over_the_gallery():
    model = tiny("retrieval")
    data = make_dataset("retrieval", "val", size=6)
    scores = evaluate(model, "retrieval", data, batch_size=4, progress=False)
    assert scores == evaluate(model, "retrieval", data, batch_size=6, progress=False)
    images, captions = retrieval_gallery("val", 6)
    words = collate([{"tokens": tokenize(caption)} for caption in captions])
    ids, mask = text_inputs(words["tokens"], words["attention_mask"])
    with torch.no_grad():
        similarity = image_embeddings(model, images) @ text_embeddings(model, ids, mask).t()
    expected = recall_at_k(similarity, ks=(1, 5))
    assert scores == pytest.approx({"R@1": (expected["image_to_text@1"] + expected["text_to_image@1"]) / 2,
                                    **expected})
    aligned = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert retrieval_scores(aligned, aligned)["R@1"] == 1.0
    assert retrieval_scores(aligned, aligned.roll(1, dims=0))["image_to_text@1"] == 0.0


def test_contrastive_loss_is_lower_for_aligned_pairs_than_for_shuffled_ones():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.1 * torch.randn(8, 16), dim=-1)
    scale = 1 / 0.07
    aligned = contrastive_loss(scale * images @ texts.t())
    shuffled = contrastive_loss(scale * images @ texts[torch.randperm(8)].t())
    assert aligned < 0.1 < shuffled
    torch.testing.assert_close(contrastive_loss(torch.zeros(8, 8)), torch.tensor(math.log(8)))
    logits = torch.randn(5, 5)
    torch.testing.assert_close(contrastive_loss(logits), contrastive_loss(logits.t()))  # symmetric
    torch.testing.assert_close(contrastive_loss(logits, torch.arange(5)), contrastive_loss(logits))
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(4, 5))


# --- pruning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["nlvr", "retrieval"])
def test_patch_reference_prunes_the_vision_tower_and_equals_dense_with_pruning_off(task):
    model = tiny(task)
    batch = _batch(task, 2)
    dense = _outputs(task, model, batch)
    sieve = patch_reference(model, ts.RandomDrop(keep=0.5, layers=(1,)))
    assert ts.is_patched(model.vision_model) and ts.sieve_of(model.vision_model) is sieve
    with ts.pruning_disabled(model.vision_model):
        torch.testing.assert_close(_outputs(task, model, batch), dense)
    with ts.trace(model.vision_model) as traces:
        pruned = _outputs(task, model, batch)
    assert traces[0].kept_tokens()[-1].tolist() == [1 + 25, 1 + 25]  # class token + half of 49 patches
    assert not torch.allclose(pruned, dense)


@pytest.mark.parametrize("task", ["nlvr", "retrieval"])
def test_the_text_encoders_take_the_mapped_ids_through_tokensieve(task):
    model = tiny(task)
    batch = _batch(task, 3)
    dense = _outputs(task, model, batch)
    encoder = text_encoder(model)
    assert encoder is (model.text_encoder if task == "nlvr" else model.text_model)
    ts.patch(encoder, ts.TopK(keep=1.0, layers=(1,)))
    torch.testing.assert_close(_outputs(task, model, batch), dense, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="no text encoder"):
        text_encoder(torch.nn.Linear(2, 2))


def test_a_ragged_vision_tower_is_cross_attended_only_where_it_kept_tokens():
    model = tiny("nlvr")
    sharpen_attention(model.vision_model, 12.0)  # peaked class attention: images keep different counts
    batch = _batch("nlvr", 3)
    patch_reference(model, ts.TopK(mass=0.5, layers=(0,)))
    with ts.trace(model.vision_model) as traces:
        logits = _outputs("nlvr", model, batch)
    assert len(set(traces[0].kept_tokens()[-1].tolist())) > 1
    for i in range(3):
        alone = {key: batch[key][i : i + 1] for key in ("image", "input_ids", "text_mask")}
        torch.testing.assert_close(logits[i : i + 1], _outputs("nlvr", model, alone), atol=1e-5, rtol=0)


def test_the_loaded_nlvr_model_cross_attends_past_image_padding_without_tokensieve(tmp_path):
    save_reference(tiny("nlvr"), tmp_path / "nlvr")
    text_encoder = load_reference("nlvr", tmp_path / "nlvr").text_encoder
    batch = _batch("nlvr", 1)
    torch.manual_seed(1)
    image = torch.randn(1, 5, text_encoder.config.encoder_hidden_size)
    padded = torch.cat([image, 50 * torch.randn(1, 3, image.shape[-1])], dim=1)
    with torch.no_grad():
        alone = text_encoder(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                             encoder_hidden_states=image).last_hidden_state
        masked = text_encoder(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                              encoder_hidden_states=padded,
                              encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 3])).last_hidden_state
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=0)


def test_tokensieve_eval_scores_the_vl_models_dense_and_pruned(tmp_path):
    save_reference(tiny("nlvr"), tmp_path / "nlvr")
    result = CliRunner().invoke(cli, ["eval", "nlvr", "random:keep=0.5,layers=(1,)", "--weights",
                                      str(tmp_path / "nlvr"), "--split", "val", "--samples", "4", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["method"] for row in rows] == ["dense", "RandomDrop(keep=0.5, layers=(1,))"]
    assert all(row["metric"] == "accuracy" for row in rows)
    assert rows[1]["gmacs"] < rows[0]["gmacs"]
    for row in rows:  # gmacs is both towers' per sample
        assert set(row["tower_gmacs"]) == {"vision", "text"}
        assert row["gmacs"] == pytest.approx(sum(row["tower_gmacs"].values()))
    # the text encoder cross-attends to the image tokens the vision tower kept
    assert rows[1]["tower_gmacs"]["text"] < rows[0]["tower_gmacs"]["text"]
    model = load_reference("nlvr", tmp_path / "nlvr")
    data = make_dataset("nlvr", "val", size=4, image_size=IMAGE_SIZES["nlvr"])
    vision = ts.flops(model.vision_model, torch.stack([data[i]["image"] for i in range(4)])).macs
    assert rows[0]["tower_gmacs"]["vision"] == pytest.approx(vision / 1e9)


def test_nlvr_warm_ups_train_blips_contrast_then_its_matching_head(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    recipe = Recipe("nlvr", (Phase(64, 2, 1e-3, 0, data="captions"), Phase(64, 2, 1e-3, 0, data="matching"),
                             Phase(64, 2, 1e-3, 0)), batch_size=4, attributes=True)
    before = {name: p.clone() for name, p in tiny("nlvr").named_parameters()}
    contrast_only = dataclasses.replace(recipe, phases=recipe.phases[:1])
    first = train_reference("nlvr", tmp_path / "run", recipe=contrast_only, progress=False,
                            model=tiny("nlvr"))
    changed = {name for name, p in first.named_parameters() if not torch.equal(p, before[name])}
    assert "vision_proj.weight" in changed and "text_proj.weight" in changed  # the contrastive head
    assert "itm_head.weight" not in changed  # the matching head waits for its phase
    model = train_reference("nlvr", tmp_path / "run", recipe=recipe, progress=False, model=tiny("nlvr"))
    assert not torch.equal(model.itm_head.weight, before["itm_head.weight"])
    for number in range(3):
        lines = (tmp_path / "run" / f"phase-{number}-64px" / "log.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(math.isfinite(json.loads(line)["loss"]) for line in lines)


def test_nlvr_learns_to_see_objects_then_states_facts_over_the_frozen_towers_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    monkeypatch.setattr(nlvr_phases, "READOUT_VALIDATION_SCENES", 4)
    recipe = Recipe("nlvr", (Phase(224, 2, 1e-3, 0, data="objects", batch_size=2),
                             Phase(224, 2, 1e-3, 0, data="finding", batch_size=2),
                             Phase(224, 2, 1e-3, 0, data="tokens", scenes=3, batch_size=2)))
    before = {name: p.clone() for name, p in tiny("nlvr").named_parameters()}
    perception = dataclasses.replace(recipe, phases=recipe.phases[:2])
    seen = train_reference("nlvr", tmp_path / "run", recipe=perception, progress=False, model=tiny("nlvr"))
    changed = {name for name, p in seen.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("vision_model.") for name in changed)  # the tower alone
    looked_at = load_recipe_phase(tiny("nlvr"), tmp_path / "run" / "phase-1-224px")  # readouts dropped
    seen_weights = dict(seen.named_parameters())
    assert all(torch.equal(p, seen_weights[name]) for name, p in looked_at.named_parameters())
    after_objects = load_recipe_phase(tiny("nlvr"), tmp_path / "run" / "phase-0-224px")
    assert not torch.equal(after_objects.vision_model.post_layernorm.weight,  # finding moved the tower
                           seen.vision_model.post_layernorm.weight)
    model = train_reference("nlvr", tmp_path / "run", recipe=recipe, progress=False, model=tiny("nlvr"))
    for name, param in model.named_parameters():
        if name.startswith("vision_model."):  # frozen while the text side learns
            assert torch.equal(param, dict(seen.named_parameters())[name]), name
    assert not torch.equal(model.itm_head.weight, before["itm_head.weight"])
    assert all(p.requires_grad for p in model.parameters())
    logs = [[json.loads(line) for line in (tmp_path / "run" / f"phase-{n}-224px" / "log.jsonl").read_text()
             .splitlines()] for n in range(3)]
    readouts = {"objects_named", "shapes_named", "centres_found", "centre_error"}
    assert set(logs[0][-1]["eval"]) == readouts and set(logs[1][-1]["eval"]) == readouts | {"kinds_found"}
    assert set(logs[2][-1]["eval"]) == {"accuracy"}
    assert [line["epoch"] for line in logs[2]] == [0, 1]  # 3 cached scenes make one batch: steps cycle them


def test_a_phase_with_the_last_ones_readouts_continues_them(tmp_path, monkeypatch):
    monkeypatch.setattr(nlvr_phases, "READOUT_VALIDATION_SCENES", 2)
    # the second phase does not move (lr 0), so it holds what it started from
    recipe = Recipe("nlvr", (Phase(224, 2, 1e-3, 0, data="finding", batch_size=2),
                             Phase(224, 1, 0.0, 0, data="finding", batch_size=2)))
    train_reference("nlvr", tmp_path / "run", recipe=recipe, progress=False, model=tiny("nlvr"))
    first, second = (load_file(latest_checkpoint(tmp_path / "run" / f"phase-{n}-224px")) for n in (0, 1))
    for name in ("model.finding_queries", "model.finding_keys.weight", "model.queries"):
        assert torch.equal(first[name], second[name]), name


def test_perception_and_statement_phases_need_blip_at_its_native_size(tmp_path):
    for phase, message in [(Phase(224, 1, 1e-3, 0, data="objects"), "train the nlvr model"),
                           (Phase(96, 1, 1e-3, 0, data="tokens", scenes=2), "native size")]:
        task, model = ("retrieval", tiny("retrieval")) if "nlvr" in message else ("nlvr", tiny("nlvr"))
        with pytest.raises(ValueError, match=message):
            train_reference(task, tmp_path / "run", recipe=Recipe(task, (phase,)), progress=False,
                            model=model)
    with pytest.raises(ValueError, match="scenes"):
        Phase(224, 1, 1e-3, 0, data="tokens")


def test_warm_up_phases_are_named_and_belong_to_nlvr(tmp_path):
    with pytest.raises(ValueError, match="'captions', 'matching', 'objects', 'finding', 'tokens'"):
        Phase(64, 2, 1e-3, 0, data="statements")
    recipe = Recipe("retrieval", (Phase(64, 2, 1e-3, 0, data="captions"),), batch_size=4)
    with pytest.raises(ValueError, match="warm up the nlvr model, not the retrieval model"):
        train_reference("retrieval", tmp_path / "run", recipe=recipe, progress=False, model=tiny("retrieval"))


def test_madtp_prunes_both_towers_of_the_nlvr_model_with_one_bank_and_fit_aligns_them(tmp_path):
    model = tiny("nlvr")
    batch = _batch("nlvr", 3)
    dense = _outputs("nlvr", model, batch)
    torch.manual_seed(0)
    sieve = patch_reference(model, ts.MADTP(temperature=16.0, alignment_tokens=8))
    assert ts.sieve_of(model.vision_model) is sieve is ts.sieve_of(model.text_encoder)
    with ts.trace(model.vision_model) as image, ts.trace(model.text_encoder) as text:
        pruned = _outputs("nlvr", model, batch)
    assert image[0].kept_tokens()[-1].max() < image[0].input_tokens
    assert text[0].kept_tokens()[-1].max() < text[0].input_tokens
    assert not torch.allclose(pruned, dense)
    sieve.shared["bank"].temperature.fill_(0.0)
    torch.testing.assert_close(_outputs("nlvr", model, batch), dense, atol=1e-5, rtol=0)
    sieve.shared["bank"].temperature.fill_(16.0)
    model.train()
    with ts.trace(model.vision_model) as image, ts.trace(model.text_encoder) as text:
        logits = match_logits(model, batch["image"], batch["input_ids"], batch["text_mask"])
    losses = sieve.method.losses([*image, *text])
    assert set(losses) == {"alignment"} and logits.shape == (3, 2)


def test_blips_own_forward_cross_attends_only_the_image_tokens_a_ragged_tower_kept():
    model = tiny("nlvr")
    sharpen_attention(model.vision_model, 12.0)  # peaked class attention: images keep different counts
    batch = _batch("nlvr", 3)
    ts.patch(model.vision_model, ts.TopK(mass=0.5, layers=(0,)))
    with torch.no_grad(), ts.trace(model.vision_model) as traces:
        own = model(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                    pixel_values=batch["image"]).itm_score
    assert len(set(traces[0].output_mask().sum(dim=1).tolist())) > 1  # a ragged image batch
    torch.testing.assert_close(own, _outputs("nlvr", model, batch), atol=1e-5, rtol=0)
    for i in range(3):  # each pair as it scores alone
        with torch.no_grad():
            one = slice(i, i + 1)
            alone = model(input_ids=batch["input_ids"][one], attention_mask=batch["text_mask"][one],
                          pixel_values=batch["image"][one]).itm_score
        torch.testing.assert_close(own[i], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["nlvr", "retrieval"])
def test_madtp_trains_both_towers_at_a_macs_budget_its_temperature_set_on_validation(task, tmp_path,
                                                                                     monkeypatch):
    from tokensieve.reference import calibration, train_method

    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    monkeypatch.setattr(calibration, "DEFAULT_CALIBRATION_SAMPLES", 8)
    # (16 alignment tokens: the least T > 0 already spends under half, so the budget is below that)
    model = train_method(task, ts.MADTP(alignment_tokens=16), tmp_path / "run", steps=2, batch_size=4,
                         macs_budget=0.4, progress=False, out_dir=tmp_path / "stored")
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(set(line["method_losses"]) == {"alignment"} for line in logs)  # both towers ran, aligned
    assert ts.sieve_of(text_encoder(model)) is ts.sieve_of(model.vision_model)  # one bank for both
    bank = ts.sieve_of(model.vision_model).shared["bank"]
    spent = calibration.calibrate_reference(model, task, macs_budget=0.4)  # again: the T it found
    assert spent.temperature == pytest.approx(float(bank.temperature))
    assert spent.macs == pytest.approx(0.4 * spent.dense_macs, rel=0.02)
    loaded = load_method(task, "madtp", tmp_path / "stored")  # both towers, the bank and its T
    assert float(ts.sieve_of(text_encoder(loaded)).shared["bank"].temperature) == float(bank.temperature)
    batch = _batch(task, 3)
    torch.testing.assert_close(_outputs(task, loaded, batch), _outputs(task, model, batch), atol=1e-5, rtol=0)


def test_madtp_trained_along_a_budget_ramp_prunes_more_as_it_falls_and_may_distil(tmp_path, monkeypatch):
    from tokensieve.reference import calibration, train_method, training
    from tokensieve.reference.compare import tower_macs

    monkeypatch.setattr(recipe_phases, "VALIDATION_SAMPLES", 4)
    monkeypatch.setattr(calibration, "DEFAULT_CALIBRATION_SAMPLES", 8)
    monkeypatch.setattr(training, "RAMP_EVERY", 1)
    monkeypatch.setattr(training, "RAMP_SAMPLES", 8)
    monkeypatch.setattr(training, "RAMP_ROUNDS", 8)
    model = load_reference("nlvr")
    patch_reference(model, ts.MADTP(alignment_tokens=16))
    bank = ts.sieve_of(model.vision_model).shared["bank"]
    data = make_dataset("nlvr", "train", size=8, image_size=IMAGE_SIZES["nlvr"])  # the ramp's samples

    def share(model: torch.nn.Module, data) -> float:
        """Both towers' MACs on `data` over their dense MACs, at the bank's T."""
        bank = ts.sieve_of(model.vision_model).shared["bank"]
        temperature = float(bank.temperature)
        bank.temperature.fill_(0.0)
        dense = sum(tower_macs(model, "nlvr", data, 8).values())
        bank.temperature.fill_(temperature)
        return sum(tower_macs(model, "nlvr", data, 8).values()) / dense

    ramp = training._BudgetRamp("nlvr", 0.4, end=4)  # aims at 0.85, 0.7, 0.55, 0.4 of dense
    shares = []
    for step in range(4):
        ramp(model, step)
        shares.append(share(model, data))
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]
    assert shares[-1] == pytest.approx(0.4, rel=0.05)
    temperature = float(bank.temperature)
    ramp(model, 4)  # past the ramp's end: T stays
    assert float(bank.temperature) == temperature

    trained = train_method("nlvr", ts.MADTP(alignment_tokens=16), tmp_path / "run", steps=2, batch_size=4,
                           macs_budget=0.4, budget_ramp=1.0, distill=True, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(line["loss_distill"] is not None for line in logs)
    validation = make_dataset("nlvr", "val", size=8, image_size=IMAGE_SIZES["nlvr"])
    assert share(trained, validation) == pytest.approx(0.4, rel=0.02)  # T set on validation at the end
    with pytest.raises(ValueError, match="budget_ramp"):
        train_method("nlvr", ts.EViT(keep=0.7), tmp_path / "evit", steps=1, budget_ramp=0.5, progress=False)

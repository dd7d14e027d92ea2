"""nlvr's statements phase: the text side over cached tower tokens, and the facts it must state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_reference_vl import TINY_TEXT, TINY_VISION, tiny

from tokensieve.reference.recipes.nlvr.perception import FindingReadouts
from tokensieve.reference.recipes.nlvr.statements import (
    FACTS_WEIGHT,
    GROUNDED_KINDS,
    GROUNDING_LAYERS,
    GROUNDING_WEIGHT,
    NlvrGrounded,
    StatementReader,
    TowerTokens,
    facts_loss,
    grounding_loss,
    seed_grounding,
    statements_collate,
    statements_loss,
)
from tokensieve.reference.vl import VL_PATCH_SIZE, build_nlvr, match_logits, nlvr_config
from tokensieve.tasks import make_dataset
from tokensieve.tasks.nlvr import FACTS, IGNORED
from tokensieve.tasks.scenes import render


def test_cached_tokens_are_the_towers_and_the_reader_scores_as_blip_does():
    model = tiny("nlvr")
    model.vision_model.train()
    statements = NlvrGrounded("val", size=3, patch=model.config.vision_config.patch_size)
    cached = TowerTokens(statements, model.vision_model, progress=False)
    assert model.vision_model.training  # the tower's mode is given back
    assert len(cached) == 3 and cached[2]["image_embeds"].dtype == torch.float16
    images = torch.stack([statements[i]["image"] for i in range(3)])
    with torch.no_grad():
        tokens = model.vision_model.eval()(pixel_values=images).last_hidden_state
    torch.testing.assert_close(cached.tokens.float(), tokens, atol=2e-3, rtol=2e-3)
    assert torch.equal(cached[1]["facts"], statements[1]["facts"])
    low = TowerTokens(statements, model.vision_model, progress=False, precision="bf16")
    assert not torch.equal(low.tokens, cached.tokens)  # the tower ran in bfloat16
    torch.testing.assert_close(low.tokens.float(), tokens, atol=0.1, rtol=0.05)
    plain = make_dataset("nlvr", "val", size=3)[1]  # the grounded samples are nlvr's, plus grounding
    assert plain["text"] == statements[1]["text"] and torch.equal(plain["image"], statements[1]["image"])

    inputs, targets = statements_collate([cached[i] for i in range(3)])
    reader = StatementReader(model).eval()
    with torch.no_grad():
        output = reader(**inputs)
        expected = match_logits(model, images, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(output.itm_score, expected, atol=2e-3, rtol=2e-3)  # fp16 tokens
    loss = statements_loss(output, targets)
    torch.testing.assert_close(loss, F.cross_entropy(output.itm_score, targets["task"])
                               + FACTS_WEIGHT * facts_loss(output.fact_logits, targets["facts"])
                               + GROUNDING_WEIGHT * grounding_loss(output.grounding, targets["grounding"]))

    # the grounded heads' attention is the text encoder's own cross-attention of [ENC]
    with torch.no_grad():
        text = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  encoder_hidden_states=inputs["image_embeds"], output_attentions=True)
    for position, layer in enumerate(GROUNDING_LAYERS):
        torch.testing.assert_close(output.grounding[:, position],
                                   text.cross_attentions[layer][:, :GROUNDED_KINDS, 0])
    assert torch.allclose(output.grounding.sum(-1), torch.ones(()))


def test_grounding_targets_weigh_the_sink_and_each_named_object_equally():
    data = NlvrGrounded("val", size=40)
    families = set()
    for index in range(40):
        scene, statement = data.scene(index)
        families.add(statement.family)
        targets = data[index]["grounding"]
        instances = render(scene).instances
        side = instances.shape[0] // VL_PATCH_SIZE
        assert targets.shape == (GROUNDED_KINDS, 1 + side * side)
        for row in range(GROUNDED_KINDS):
            if row >= len(statement.about):
                assert not targets[row].any()
                continue
            kind = statement.about[row]
            visible = [i for i in scene.indices(*kind) if (instances == i).any()]
            share = 1 / (len(visible) + 1)
            torch.testing.assert_close(targets[row].sum(), torch.tensor(1.0))
            torch.testing.assert_close(targets[row, 0], torch.tensor(share))
            # each visible object's share, spread by its pixels in each patch (counted one by one)
            expected = torch.zeros(side * side)
            for i in visible:
                pixels = torch.zeros(side * side)
                for y, x in zip(*(instances == i).nonzero(), strict=True):
                    pixels[(y // VL_PATCH_SIZE) * side + x // VL_PATCH_SIZE] += 1
                expected += share * pixels / pixels.sum()
            torch.testing.assert_close(targets[row, 1:], expected)
    assert {"relation", "compare", "count"} <= families  # one- and two-kind statements were seen


def test_the_grounding_loss_is_least_at_the_targets_and_skips_unnamed_kinds():
    targets = torch.zeros(2, GROUNDED_KINDS, 5)
    targets[0, 0] = torch.tensor([0.5, 0.5, 0, 0, 0])
    targets[1, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25, 0])
    targets[1, 1] = torch.tensor([0.5, 0, 0, 0, 0.5])
    entropy = torch.log(torch.tensor(2.0))  # the targets' mean entropy: (ln 2 + ln 4 + ln 2) / 3
    expected = (entropy + 2 * entropy + entropy) / 3
    at_targets = targets[:, None].clamp(min=1e-9)  # one grounded layer attending as taught
    torch.testing.assert_close(grounding_loss(at_targets, targets), expected)
    uniform = torch.full((2, 1, GROUNDED_KINDS, 5), 0.2)
    assert grounding_loss(uniform, targets) > expected
    # the unnamed kind (sample 0, row 1) adds nothing, whatever its attention
    elsewhere = at_targets.clone()
    elsewhere[0, 0, 1] = torch.tensor([0, 0, 0, 0, 1.0])
    torch.testing.assert_close(grounding_loss(elsewhere, targets), expected)


def test_the_facts_loss_counts_only_the_facts_a_statement_asks():
    # sample 0 asks count_first (class 2), sample 1 asks colour (class 5); nothing else is counted
    facts = torch.full((2, len(FACTS)), IGNORED)
    facts[0, 0], facts[1, 2] = 2, 5
    logits = torch.randn(2, sum(FACTS.values()))
    count, colour = logits[:, :5], logits[:, 10:16]
    expected = F.cross_entropy(count[:1], torch.tensor([2])) + F.cross_entropy(colour[1:], torch.tensor([5]))
    torch.testing.assert_close(facts_loss(logits, facts), expected)


def test_seeded_grounded_heads_score_the_tokens_as_the_finding_readout_does():
    torch.manual_seed(0)  # four heads: two grounded, two left alone
    model = build_nlvr(nlvr_config(vision=TINY_VISION, text={**TINY_TEXT, "num_attention_heads": 4},
                                   projection=16))
    reader = StatementReader(model)
    attention = model.text_encoder.encoder.layer[GROUNDING_LAYERS[0]].crossattention.self
    width = attention.attention_head_size
    finding = FindingReadouts(model.vision_model, key_width=width)
    tokens = torch.randn(2, 5, model.config.vision_config.hidden_size)
    before = attention.key(tokens)
    seed_grounding(reader, finding)
    keys = attention.key(tokens).view(2, 5, -1, width)
    for head in range(GROUNDED_KINDS):
        torch.testing.assert_close(keys[:, :, head], finding.finding_keys(tokens))
    # the other heads keep their own keys
    torch.testing.assert_close(keys[:, :, GROUNDED_KINDS:].flatten(2),
                               before.view(2, 5, -1, width)[:, :, GROUNDED_KINDS:].flatten(2))
    with pytest.raises(ValueError, match="key_width"):
        seed_grounding(reader, FindingReadouts(model.vision_model, key_width=width + 1))

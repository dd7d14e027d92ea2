"""nlvr's statements phase: the text side over cached tower tokens, and the facts it must state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_reference_vl import tiny

from tokensieve.reference.statements import (
    FACTS_WEIGHT,
    StatementReader,
    TowerTokens,
    facts_loss,
    statements_collate,
    statements_loss,
)
from tokensieve.reference.vl import match_logits
from tokensieve.tasks import make_dataset
from tokensieve.tasks.nlvr import FACTS, IGNORED


def test_cached_tokens_are_the_towers_and_the_reader_scores_as_blip_does():
    model = tiny("nlvr")
    model.vision_model.train()
    statements = make_dataset("nlvr", "val", size=3)
    cached = TowerTokens(statements, model.vision_model, progress=False)
    assert model.vision_model.training  # the tower's mode is given back
    assert len(cached) == 3 and cached[2]["image_embeds"].dtype == torch.float16
    images = torch.stack([statements[i]["image"] for i in range(3)])
    with torch.no_grad():
        tokens = model.vision_model.eval()(pixel_values=images).last_hidden_state
    torch.testing.assert_close(cached.tokens.float(), tokens, atol=2e-3, rtol=2e-3)
    assert torch.equal(cached[1]["facts"], statements[1]["facts"])

    inputs, targets = statements_collate([cached[i] for i in range(3)])
    reader = StatementReader(model).eval()
    with torch.no_grad():
        output = reader(**inputs)
        expected = match_logits(model, images, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(output.itm_score, expected, atol=2e-3, rtol=2e-3)  # fp16 tokens
    loss = statements_loss(output, targets)
    torch.testing.assert_close(loss, F.cross_entropy(output.itm_score, targets["task"])
                               + FACTS_WEIGHT * facts_loss(output.fact_logits, targets["facts"]))


def test_the_facts_loss_counts_only_the_facts_a_statement_asks():
    # sample 0 asks count_first (class 2), sample 1 asks colour (class 5); nothing else is counted
    facts = torch.full((2, len(FACTS)), IGNORED)
    facts[0, 0], facts[1, 2] = 2, 5
    logits = torch.randn(2, sum(FACTS.values()))
    count, colour = logits[:, :5], logits[:, 10:16]
    expected = F.cross_entropy(count[:1], torch.tensor([2])) + F.cross_entropy(colour[1:], torch.tensor([5]))
    torch.testing.assert_close(facts_loss(logits, facts), expected)

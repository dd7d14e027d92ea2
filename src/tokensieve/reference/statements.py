"""Training BLIP's text side on nlvr's statements over a frozen tower's tokens, for training only.

Each statement is true or false by an interaction of text and image (whether the count seen
equals the count stated), so neither alone moves the yes/no loss, and BLIP's text encoder sat at
chance even on perfect object tokens. `StatementReader` therefore also reads the text encoder's
[ENC] token with a linear facts head, trained to state what the statement asks of the scene
(`tasks.nlvr.FACTS`: the named kind's count, the named shape's colour, which named object lies
further right and lower), answers that each follow from the image once the statement's words have
found their objects. The head is dropped when the model ships.

Once the tower carries what the statements name (reference/perception.py), it is frozen and its
tokens are computed once for a set of training scenes (`TowerTokens`): a step then costs the text
encoder alone, several times less than a step through the tower, and the text side, which learns
slowly, gets that many more steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tokensieve.reference.vl import text_inputs
from tokensieve.tasks import collate as collate_samples
from tokensieve.tasks.nlvr import FACTS, IGNORED

FACTS_WEIGHT = 1.0  # of the facts loss (summed over the facts a statement asks), against the ITM loss's 1
CACHE_BATCH = 64  # images a forward of the frozen tower computes at once
TEXT_KEYS = ("tokens", "label", "facts")  # what TowerTokens keeps of each nlvr sample beside the tokens


@dataclass
class StatementOutput:
    itm_score: Tensor  # [B, 2] (false, true), as BLIP's
    fact_logits: Tensor  # [B, sum(FACTS.values())]


class StatementReader(nn.Module):
    """BLIP's text encoder and ITM head reading given image tokens, plus a linear facts head on
    the [ENC] token; the vision tower does not run."""

    def __init__(self, model: transformers.BlipForImageTextRetrieval) -> None:
        super().__init__()
        self.model = model
        self.facts = nn.Linear(model.text_encoder.config.hidden_size, sum(FACTS.values()))

    def forward(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> StatementOutput:
        """`image_embeds` [B, N, C]: the vision tower's last_hidden_state; the text as
        `vl.text_inputs` gives it."""
        text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=image_embeds).last_hidden_state[:, 0]
        return StatementOutput(itm_score=self.model.itm_head(text), fact_logits=self.facts(text))


def statements_loss(output: StatementOutput, targets: dict) -> Tensor:
    """ITM cross-entropy against targets["task"] + FACTS_WEIGHT · facts_loss against targets["facts"]."""
    return F.cross_entropy(output.itm_score, targets["task"]) + FACTS_WEIGHT * facts_loss(
        output.fact_logits, targets["facts"])


def facts_loss(logits: Tensor, facts: Tensor) -> Tensor:
    """Cross-entropy of each fact (`tasks.nlvr.FACTS`) over the samples that ask it, summed over
    the facts: logits [B, sum(FACTS.values())], facts [B, len(FACTS)] (IGNORED where not asked)."""
    total = logits.new_zeros(())
    for _, asked_logits, answers in asked_facts(logits, facts):
        if len(answers):
            total = total + F.cross_entropy(asked_logits, answers)
    return total


def asked_facts(logits: Tensor, facts: Tensor) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Per fact of `tasks.nlvr.FACTS`: its name, and the logits and answers of the samples that ask it."""
    chunks = logits.split(list(FACTS.values()), dim=1)
    for column, (name, chunk) in enumerate(zip(FACTS, chunks, strict=True)):
        asked = facts[:, column] != IGNORED
        yield name, chunk[asked], facts[asked, column]


class TowerTokens(Dataset):
    """nlvr samples with their image replaced by the frozen `tower`'s tokens, computed once here:
    {"image_embeds": float16 [N, C], "tokens", "label", "facts"}."""

    def __init__(self, statements: Dataset, tower: nn.Module, progress: bool = True) -> None:
        self.samples: list[dict] = []
        chunks: list[Tensor] = []
        was_training = tower.training
        tower.eval()
        bar = tqdm(range(0, len(statements), CACHE_BATCH), desc="tower tokens", disable=not progress)
        with torch.no_grad():
            for start in bar:
                batch = [statements[i] for i in range(start, min(len(statements), start + CACHE_BATCH))]
                images = torch.stack([sample["image"] for sample in batch])
                chunks.append(tower(pixel_values=images).last_hidden_state.half())
                self.samples += [{key: sample[key] for key in TEXT_KEYS} for sample in batch]
        tower.train(was_training)
        self.tokens = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {**self.samples[index], "image_embeds": self.tokens[index]}


def statements_collate(samples: list[dict]) -> tuple[dict, dict]:
    """TowerTokens samples → (StatementReader's keyword inputs, statements_loss's targets)."""
    batch = collate_samples(samples)
    input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
    inputs = {"image_embeds": batch["image_embeds"].float(), "input_ids": input_ids,
              "attention_mask": attention_mask}
    return inputs, {"task": batch["label"], "facts": batch["facts"]}

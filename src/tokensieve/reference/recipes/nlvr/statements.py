"""Training BLIP's text side on nlvr's statements over a frozen tower's tokens, for training only.

Each statement is true or false by an interaction of text and image (whether the count seen
equals the count stated), so neither alone moves the yes/no loss, and BLIP's text encoder sat at
chance even on perfect object tokens. `StatementReader` therefore also reads the text encoder's
[ENC] token with a linear facts head, trained to state what the statement asks of the scene
(`tasks.nlvr.FACTS`: the named kind's count, the named shape's colour, which named object lies
further right and lower), answers that each follow from the image once the statement's words have
found their objects. The head is dropped when the model ships.

The perception phase teaches the tower's tokens where each object lies, yet the reader stayed at
chance on relations and counts (docs/reference.md): its cross-attention must first learn where the
named objects are. So two heads of its [ENC] token's cross-attention are also taught where to
look (`grounding_targets`): head 0 on
the objects of the first kind the statement names, head 1 on those of the second, each object
with weight 1 spread over its patches, and the class token (a sink) with weight 1. The sink's
share, 1/(n + 1), says how many objects match, and an object's mean token says where it is.

Once the tower carries what the statements name (perception.py, beside this file), it is frozen
and its tokens are computed once for a set of training scenes (`TowerTokens`): a step then costs
the text encoder alone, several times less than a step through the tower, and the text side,
which learns slowly, gets that many more steps.
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

from tokensieve.modes import in_mode
from tokensieve.reference.recipes.nlvr.perception import FindingReadouts, kind_targets
from tokensieve.reference.vl import VL_PATCH_SIZE, text_inputs
from tokensieve.tasks import collate as collate_samples
from tokensieve.tasks.nlvr import FACTS, IGNORED, NlvrDataset, Statement
from tokensieve.tasks.scenes import Rendering, Scene, render
from tokensieve.train.precision import Precision, autocast, check_precision

FACTS_WEIGHT = 1.0  # of the facts loss (summed over the facts a statement asks), against the ITM loss's 1
GROUNDING_WEIGHT = 1.0  # of the grounding loss (summed over GROUNDING_LAYERS)
GROUNDING_LAYERS = (1,)  # text encoder layers whose [ENC] cross-attention is taught where to look
GROUNDED_KINDS = 2  # a statement names at most two kinds; head k of those layers finds kind k
CACHE_BATCH = 64  # images a forward of the frozen tower computes at once
TEXT_KEYS = ("tokens", "label", "facts", "grounding")  # what TowerTokens keeps beside the tokens


@dataclass
class StatementOutput:
    itm_score: Tensor  # [B, 2] (false, true), as BLIP's
    fact_logits: Tensor  # [B, sum(FACTS.values())]
    grounding: Tensor  # [B, len(GROUNDING_LAYERS), GROUNDED_KINDS, N]: [ENC]'s attention in those heads


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
        output = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                         encoder_hidden_states=image_embeds, output_attentions=True)
        text = output.last_hidden_state[:, 0]
        grounding = torch.stack([output.cross_attentions[layer][:, :GROUNDED_KINDS, 0]
                                 for layer in GROUNDING_LAYERS], dim=1)
        return StatementOutput(itm_score=self.model.itm_head(text), fact_logits=self.facts(text),
                               grounding=grounding)


def seed_grounding(reader: StatementReader, finding: FindingReadouts) -> None:
    """Start the grounded heads' keys from the finding readout's (`perception.FindingReadouts`),
    trained on the same tower to find every kind by one linear key of a head's width: the heads
    then only have to learn the query of the kind a statement names."""
    for layer in GROUNDING_LAYERS:
        attention = reader.model.text_encoder.encoder.layer[layer].crossattention.self
        width, key = attention.attention_head_size, attention.key
        if finding.finding_keys.out_features != width:
            raise ValueError(f"the finding readout's keys are {finding.finding_keys.out_features} wide, "
                             f"the grounded heads' {width}: train it with key_width={width}")
        with torch.no_grad():
            for head in range(GROUNDED_KINDS):
                key.weight[head * width:(head + 1) * width] = finding.finding_keys.weight
                key.bias[head * width:(head + 1) * width] = finding.finding_keys.bias


def statements_loss(output: StatementOutput, targets: dict) -> Tensor:
    """ITM cross-entropy against targets["task"] + FACTS_WEIGHT · facts_loss against
    targets["facts"] + GROUNDING_WEIGHT · grounding_loss against targets["grounding"]."""
    return (F.cross_entropy(output.itm_score, targets["task"])
            + FACTS_WEIGHT * facts_loss(output.fact_logits, targets["facts"])
            + GROUNDING_WEIGHT * grounding_loss(output.grounding, targets["grounding"]))


def grounding_loss(attention: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the grounded heads' attention [B, layers, GROUNDED_KINDS, N] against
    `grounding_targets` [B, GROUNDED_KINDS, N], summed over the layers and averaged over the
    kinds the statements name (rows of zeros name none)."""
    if attention.shape[-1] != targets.shape[-1]:
        raise ValueError(f"the grounding targets cover {targets.shape[-1]} tokens, the attention "
                         f"{attention.shape[-1]}: make them with the tower's patch size")
    named = targets.sum(-1) > 0
    if not named.any():
        return attention.new_zeros(())
    cross_entropy = -(targets[:, None] * attention.clamp(min=1e-9).log()).sum(-1).sum(1)
    return cross_entropy[named].mean()


def grounding_targets(scene: Scene, statement: Statement, rendering: Rendering,
                      patch: int = VL_PATCH_SIZE) -> Tensor:
    """float32 [GROUNDED_KINDS, 1 + side²]: for each kind the statement names, in order, where its
    grounded heads should look (`perception.kind_targets`); rows past the kinds named are 0."""
    if len(statement.about) > GROUNDED_KINDS:
        raise ValueError(f"a statement names at most {GROUNDED_KINDS} kinds, not {len(statement.about)}")
    named = kind_targets(scene, rendering, statement.about, patch)
    return torch.cat([named, named.new_zeros(GROUNDED_KINDS - len(named), named.shape[1])])


class NlvrGrounded(NlvrDataset):
    """nlvr samples with "grounding": float32 [GROUNDED_KINDS, 1 + side²] (`grounding_targets`
    for a tower with `patch`-pixel patches)."""

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 patch: int = VL_PATCH_SIZE) -> None:
        super().__init__(split, size, image_size)
        self.patch = patch

    def sample(self, index: int) -> dict:
        scene, statement = self.scene(index)
        rendering = render(scene)
        return {**self.sample_of(scene, statement, rendering),
                "grounding": grounding_targets(scene, statement, rendering, self.patch)}


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
    """`NlvrGrounded` samples with their image replaced by the frozen `tower`'s tokens, computed
    once here: {"image_embeds": float16 [N, C], "tokens", "label", "facts", "grounding"}; with
    `precision="bf16"` the tower runs under bfloat16 autocast."""

    def __init__(self, statements: Dataset, tower: nn.Module, progress: bool = True,
                 precision: Precision = "fp32") -> None:
        check_precision(precision, "TowerTokens")
        self.samples: list[dict] = []
        chunks: list[Tensor] = []
        bar = tqdm(range(0, len(statements), CACHE_BATCH), desc="tower tokens", disable=not progress)
        device = next(tower.parameters()).device
        with in_mode(tower, training=False), torch.no_grad(), autocast(precision, device):
            for start in bar:
                batch = [statements[i] for i in range(start, min(len(statements), start + CACHE_BATCH))]
                images = torch.stack([sample["image"] for sample in batch])
                chunks.append(tower(pixel_values=images).last_hidden_state.half())
                self.samples += [{key: sample[key] for key in TEXT_KEYS} for sample in batch]
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
    return inputs, {"task": batch["label"], "facts": batch["facts"], "grounding": batch["grounding"]}

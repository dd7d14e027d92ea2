"""Can BLIP's text encoder learn nlvr's statements when perception is perfect?

The image is replaced by one token per object, its colour, shape, centre and size embedded (the
vision tower is skipped), and the nlvr reference model's own text encoder and ITM head
(`build_nlvr`) train on fresh training statements: with the ITM loss alone, or with the facts
head of reference/recipes/nlvr/statements.py beside it (`--facts`). Prints validation accuracy
per statement family every 250 steps and writes the curve to
benchmarks/results/nlvr_oracle-{itm,facts}.json.

    python benchmarks/nlvr_oracle.py            # the ITM loss alone (about 15 minutes, one thread)
    python benchmarks/nlvr_oracle.py --facts    # ITM + facts
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tokensieve.reference.recipes.nlvr.statements import facts_loss
from tokensieve.reference.vl import build_nlvr, text_inputs
from tokensieve.tasks import COLOUR_NAMES, SHAPES, collate, make_dataset
from tokensieve.tasks.language import tokenize
from tokensieve.tasks.nlvr import FACTS, statement_facts
from tokensieve.train import warmup_cosine

MAX_OBJECTS = 12
VALIDATION = 1000


class ObjectTokens(nn.Module):
    """A class token, then one token per object: colour and shape embeddings plus a linear map of
    (x, y, radius), each relative to the image size; layer-normed as a tower's output is."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Embedding(len(COLOUR_NAMES), width)
        self.shape = nn.Embedding(len(SHAPES), width)
        self.place = nn.Linear(3, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, kinds: Tensor, places: Tensor) -> Tensor:
        """kinds [B, M, 2] (colour, shape) and places [B, M, 3] -> [B, 1 + M, width]."""
        objects = self.colour(kinds[..., 0]) + self.shape(kinds[..., 1]) + self.place(places)
        return self.norm(torch.cat([self.cls.expand(len(kinds), -1, -1), objects], dim=1))


def encode(data, indices) -> dict:
    """The batch's statements, object tables and targets, from the scenes alone (nothing rendered)."""
    kinds = torch.zeros(len(indices), MAX_OBJECTS, 2, dtype=torch.long)
    places = torch.zeros(len(indices), MAX_OBJECTS, 3)
    present = torch.zeros(len(indices), 1 + MAX_OBJECTS, dtype=torch.long)
    tokens, labels, facts, families = [], [], [], []
    for row, index in enumerate(indices):
        scene, statement = data.scene(int(index))
        for slot, obj in enumerate(scene.objects):
            kinds[row, slot] = torch.tensor([COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape)])
            places[row, slot] = torch.tensor([*obj.center, obj.radius]) / scene.size
        present[row, : 1 + len(scene.objects)] = 1
        tokens.append(tokenize(statement.text))
        labels.append(int(statement.truth))
        facts.append(torch.from_numpy(statement_facts(scene, statement)))
        families.append(statement.family)
    words = collate([{"tokens": t} for t in tokens])
    input_ids, attention_mask = text_inputs(words["tokens"], words["attention_mask"])
    return {"kinds": kinds, "places": places, "present": present, "input_ids": input_ids,
            "attention_mask": attention_mask, "labels": torch.tensor(labels), "facts": torch.stack(facts),
            "families": families}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", action="store_true", help="train the facts head beside the ITM head")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    blip = build_nlvr()
    text, itm = blip.text_encoder, blip.itm_head
    width = text.config.hidden_size
    objects = ObjectTokens(width)
    facts_head = nn.Linear(width, sum(FACTS.values()))
    parts = nn.ModuleList([text, itm, objects] + ([facts_head] if args.facts else []))
    optimizer = torch.optim.AdamW(parts.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, args.steps, warmup_steps=args.steps // 20)

    def forward(batch: dict) -> tuple[Tensor, Tensor]:
        memory = objects(batch["kinds"], batch["places"])
        pooled = text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      encoder_hidden_states=memory, encoder_attention_mask=batch["present"]
                      ).last_hidden_state[:, 0]
        return itm(pooled), facts_head(pooled)

    train = make_dataset("nlvr", "train", size=args.steps * args.batch)
    validation = make_dataset("nlvr", "val", size=VALIDATION)
    held_out = [encode(validation, range(start, start + 250)) for start in range(0, VALIDATION, 250)]

    def evaluate() -> dict[str, float]:
        parts.eval()
        right = defaultdict(list)
        with torch.no_grad():
            for batch in held_out:
                hits = (forward(batch)[0].argmax(dim=1) == batch["labels"]).tolist()
                for family, hit in zip(batch["families"], hits, strict=True):
                    right[family].append(hit)
                    right["all"].append(hit)
        parts.train()
        return {family: round(sum(hits) / len(hits), 3) for family, hits in sorted(right.items())}

    curve, losses = [], []
    bar = tqdm(range(args.steps), desc="facts" if args.facts else "itm")
    for step in bar:
        batch = encode(train, range(step * args.batch, (step + 1) * args.batch))
        itm_logits, fact_logits = forward(batch)
        loss = F.cross_entropy(itm_logits, batch["labels"])
        if args.facts:
            loss = loss + facts_loss(fact_logits, batch["facts"])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parts.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            point = {"step": step + 1, "loss": round(sum(losses) / len(losses), 3), "accuracy": evaluate()}
            curve.append(point)
            losses = []
            bar.write(json.dumps(point))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"nlvr_oracle-{'facts' if args.facts else 'itm'}.json"
    run = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "curve": curve}
    path.write_text(json.dumps(run, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

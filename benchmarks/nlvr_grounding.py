"""Does nlvr's statements reader fail at finding the objects a statement names, or at reading them?

Over the frozen tower of a recipe run, a fresh text side (`StatementReader`) trains as the
recipe's statements phase does (ITM + facts + grounding losses, on the tower's tokens of
training scenes computed once), with one change under `--attention targets`: the grounded heads
of [ENC] (`statements.GROUNDING_LAYERS`, heads 0 and 1) do not compute their attention, they are
given `grounding_targets`, the named objects and the class token. The reader then only has to
read what it is shown. Prints validation accuracy per statement family every 250 steps and
writes the curve to benchmarks/results/nlvr_grounding-{learned,targets}.json.

    python benchmarks/nlvr_grounding.py --run runs/nlvr/phase-1-224px --attention targets
    python benchmarks/nlvr_grounding.py --run runs/nlvr/phase-1-224px --attention learned
    python benchmarks/nlvr_grounding.py --run runs/nlvr/phase-1-224px --attention learned --seed-keys

`--seed-keys` starts the grounded heads' keys from the run's finding readout, as the recipe's
statements phase does (statements.seed_grounding); the curve goes to nlvr_grounding-learned-seeded.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tokensieve.reference import load_recipe_phase
from tokensieve.reference.recipes.nlvr.phases import finding_readouts
from tokensieve.reference.recipes.nlvr.statements import (
    GROUNDED_KINDS,
    GROUNDING_LAYERS,
    NlvrGrounded,
    StatementReader,
    TowerTokens,
    seed_grounding,
    statements_collate,
    statements_loss,
)
from tokensieve.reference.vl import build_nlvr
from tokensieve.train import load_trained, warmup_cosine

BATCH = 64


@contextmanager
def attention_given(reader: StatementReader, holder: dict) -> Iterator[None]:
    """Inside the block, [ENC]'s attention in the grounded heads of the first grounded layer is
    holder["targets"] [B, GROUNDED_KINDS, N] wherever a row names a kind (else its own)."""
    attention = reader.model.text_encoder.encoder.layer[GROUNDING_LAYERS[0]].crossattention.self
    original = attention.forward

    def given(hidden_states: Tensor, attention_mask: Tensor | None = None,
              encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
              **kwargs: object) -> tuple[Tensor, Tensor]:
        _, probs = original(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                            **kwargs)
        targets = holder["targets"]
        named = targets.sum(dim=-1, keepdim=True) > 0
        probs = probs.clone()
        probs[:, :GROUNDED_KINDS, 0] = torch.where(named, targets, probs[:, :GROUNDED_KINDS, 0])
        batch, tokens = encoder_hidden_states.shape[:2]
        values = attention.value(encoder_hidden_states).view(batch, tokens, -1, attention.attention_head_size)
        context = probs @ values.transpose(1, 2)  # [B, heads, T, head size]
        return context.transpose(1, 2).flatten(2), probs

    attention.forward = given
    try:
        yield
    finally:
        attention.forward = original


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a recipe phase whose tower is read")
    parser.add_argument("--attention", choices=("learned", "targets"), default="targets")
    parser.add_argument("--seed-keys", action="store_true",
                        help="start the grounded heads' keys from the run's finding readout "
                             "(statements.seed_grounding)")
    parser.add_argument("--scenes", type=int, default=24_000, help="training scenes (tokens computed once)")
    parser.add_argument("--validation", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=1_500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_recipe_phase(build_nlvr(), args.run)
    patch = model.config.vision_config.patch_size
    train = TowerTokens(NlvrGrounded("train", size=args.scenes, patch=patch), model.vision_model)
    validation_scenes = NlvrGrounded("val", size=args.validation, patch=patch)
    validation = TowerTokens(validation_scenes, model.vision_model)
    families = [validation_scenes.scene(i)[1].family for i in range(args.validation)]

    torch.manual_seed(0)
    reader = StatementReader(build_nlvr())  # a fresh text side over the run's frozen tower
    reader.model.vision_model.requires_grad_(False)
    if args.seed_keys:
        finding = finding_readouts(build_nlvr())
        load_trained(finding, args.run)
        seed_grounding(reader, finding)
    trained = [p for p in reader.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, args.steps, warmup_steps=args.steps // 10)
    holder: dict = {}
    given = attention_given(reader, holder) if args.attention == "targets" else nullcontext()
    generator = torch.Generator().manual_seed(0)
    curve = []
    with given:
        for step in tqdm(range(1, args.steps + 1), desc=f"reader ({args.attention} attention)"):
            picked = torch.randint(len(train), (BATCH,), generator=generator).tolist()
            inputs, targets = statements_collate([train[i] for i in picked])
            holder["targets"] = targets["grounding"]
            loss = statements_loss(reader(**inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            if step % 250 == 0 or step == args.steps:
                scores = accuracy(reader, validation, families, holder)
                curve.append({"step": step, **scores})
                tqdm.write(json.dumps(curve[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(args.run), "attention": args.attention, "seed_keys": args.seed_keys,
              "scenes": args.scenes, "validation": args.validation, "steps": args.steps, "lr": args.lr,
              "curve": curve}
    name = f"{args.attention}-seeded" if args.seed_keys else args.attention
    (args.out / f"nlvr_grounding-{name}.json").write_text(json.dumps(result, indent=1) + "\n")


@torch.no_grad()
def accuracy(reader: StatementReader, validation: TowerTokens, families: list[str], holder: dict
             ) -> dict[str, float]:
    """Validation accuracy per statement family and over all."""
    reader.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(validation), 250):
        indices = range(start, min(len(validation), start + 250))
        inputs, targets = statements_collate([validation[i] for i in indices])
        holder["targets"] = targets["grounding"]
        right = (reader(**inputs).itm_score.argmax(dim=1) == targets["task"]).tolist()
        for index, ok in zip(indices, right, strict=True):
            hits[families[index]].append(ok)
            hits["all"].append(ok)
    reader.train()
    return {family: round(sum(oks) / len(oks), 3) for family, oks in sorted(hits.items())}


if __name__ == "__main__":
    main()

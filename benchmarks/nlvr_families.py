"""What has the nlvr model learned? Accuracy per statement family, and on caption matching.

Scores a run's phase (or the shipped weights) on validation statements, family by family, and on
validation caption matching (tasks.matching: an image with its own caption or another scene's),
an earlier recipe's warm-up. With `--facts`, a statements phase's facts head
(reference/recipes/nlvr/statements.py) is scored too: the share of statements asking each fact
that it states.

    python benchmarks/nlvr_families.py --run runs/nlvr/phase-2-112px --size 112
    python benchmarks/nlvr_families.py --run runs/nlvr/phase-1-224px --samples 500 --facts
    python benchmarks/nlvr_families.py --samples 1000 --method "random:keep=0.5,layers=(3,)"

`--method` scores the model with its vision tower pruned (reference.patch_reference). `--by size`
groups the statements by the size class of the smallest named object in the scene ("none" when
the statement names none that is there) instead of by family; `--json PATH` writes the table.

    python benchmarks/nlvr_families.py --run runs/nlvr/phase-3-224px --samples 1000 --by size \
        --method "random:keep=0.5,layers=(3,)" --json benchmarks/results/nlvr_sizes-random.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tokensieve.loading import parse_method
from tokensieve.reference import build_model, load_recipe_phase, load_reference, patch_reference
from tokensieve.reference.recipes.nlvr.statements import StatementReader, asked_facts
from tokensieve.reference.vl import match_logits, text_inputs
from tokensieve.tasks import SIZE_CLASSES, collate, make_dataset
from tokensieve.tasks.matching import MatchingDataset
from tokensieve.train import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a recipe phase directory (default: the shipped weights)")
    parser.add_argument("--size", type=int, default=224, help="image size to score at")
    parser.add_argument("--samples", type=int, default=400, help="validation statements and matching pairs")
    parser.add_argument("--facts", action="store_true",
                        help="also score the facts head of a statements phase")
    parser.add_argument("--method", default=None, help="prune the vision tower, e.g. 'evit:keep=0.7'")
    parser.add_argument("--by", choices=("family", "size"), default="family",
                        help="group statements by family or by their smallest named object's size")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.method and args.facts:
        parser.error("--facts reads the unpatched tower's tokens; score --method without it")
    torch.set_num_threads(args.threads)
    reader = None
    if args.facts:
        if not args.run:
            parser.error("--facts scores a statements phase's facts head: give its --run")
        reader = StatementReader(build_model("nlvr"))
        load_trained(reader, args.run)
        reader.eval()
        model = reader.model
    else:
        model = load_recipe_phase(build_model("nlvr"), args.run) if args.run else load_reference("nlvr")
    model.eval()
    if args.method:
        patch_reference(model, parse_method(args.method))
    stated: dict[str, list[bool]] = defaultdict(list)
    statements = make_dataset("nlvr", "val", size=args.samples, image_size=args.size)
    matching = MatchingDataset("val", size=args.samples, image_size=args.size)
    right: dict[str, list[bool]] = defaultdict(list)
    for data in (statements, matching):
        # --by size: each statement's group, in the (unshuffled) loader's order
        sizes = (iter([_smallest_named(data, index) for index in range(len(data))])
                 if args.by == "size" and data is statements else None)
        for batch in DataLoader(data, batch_size=50, collate_fn=collate):
            input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
            with torch.no_grad():
                if reader is None:
                    answers = match_logits(model, batch["image"], input_ids, attention_mask).argmax(-1)
                else:  # the reader's ITM is match_logits' on the unpatched tower, and gives the facts too
                    image = model.vision_model(pixel_values=batch["image"],
                                               interpolate_pos_encoding=args.size != 224).last_hidden_state
                    output = reader(image, input_ids, attention_mask)
                    answers = output.itm_score.argmax(-1)
            for family, correct in zip(batch["family"], (answers == batch["label"]).tolist(), strict=True):
                right[next(sizes) if sizes else family].append(correct)
            if reader is not None and "facts" in batch:
                for fact, logits, truth in asked_facts(output.fact_logits, batch["facts"]):
                    stated[fact] += (logits.argmax(-1) == truth).tolist()
    weights = "run " + args.run if args.run else "shipped weights"
    pruned = f", vision tower pruned by {args.method}" if args.method else ""
    print(f"nlvr: validation at {args.size} px, {weights}{pruned}")
    print(f"{args.by:12s} {'count':>6s} {'accuracy':>9s}")
    for family in sorted(right, key=lambda name: (name == "match", name)):
        print(f"{family:12s} {len(right[family]):6d} {sum(right[family]) / len(right[family]):9.4f}")
    every = [value for family, values in right.items() if family != "match" for value in values]
    print(f"{'statements':12s} {len(every):6d} {sum(every) / len(every):9.4f}")
    for fact, hits in stated.items():
        print(f"{'fact ' + fact:18s} {len(hits):6d} {sum(hits) / len(hits):9.4f}")
    if args.json:
        table = {group: {"count": len(values), "accuracy": sum(values) / len(values)}
                 for group, values in right.items()}
        table["statements"] = {"count": len(every), "accuracy": sum(every) / len(every)}
        args.json.write_text(json.dumps({"run": args.run, "method": args.method, "by": args.by,
                                         "samples": args.samples, "size": args.size, "groups": table},
                                        indent=2) + "\n")


def _smallest_named(statements, index: int) -> str:
    """The size class of the smallest object in the scene of the kinds the statement names."""
    scene, statement = statements.scene(index)
    named = [scene.objects[i].size_class for kind in statement.about for i in scene.indices(*kind)]
    return min(named, key=list(SIZE_CLASSES).index) if named else "none"


if __name__ == "__main__":
    main()

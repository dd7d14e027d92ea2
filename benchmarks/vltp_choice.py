"""Why the shipped VLTP prunes from block 2 and leaves the tos mask decoder as shipped: the paper's
recipe taken apart on the validation split.

The paper's recipe is runs/vltp-tos/'s VLTP(keep=0.3, width=64, heads=4) at its default stage
(block 3, the first global-attention block), trained with SAM's mask decoder beside it
(`python benchmarks/vltp_tos.py` trains it). On `--samples` validation sentences this scores:

- dense, the shipped model;
- the paper's recipe as trained, and how many of the target's cells its decoder keeps (recall);
- the same with every target cell kept first (an oracle of the target: what better relevance
  alone could recover);
- its fine-tuned mask decoder on the unpruned map (what the mask decoder learned);
- its decoder one block earlier (block 2, keep 0.42: the same MACs) over the shipped mask decoder.

Writes benchmarks/results/vltp_choice-val.md and .json.

    python benchmarks/vltp_choice.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tokensieve as ts
from tokensieve.reference import image_encoder, load_reference, patch_reference
from tokensieve.reference.compare import encoder_macs
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.tasks import collate, giou, intersection_union, make_dataset
from tokensieve.train import load_trained

RUN = Path("runs/vltp-tos/vltp-keep0.3-width64-heads4-frozenencoder-steps300-hostlr0.1")
PAPER = ts.VLTP(keep=0.3, width=64, heads=4)
EARLIER = ts.VLTP(keep=0.42, layers=(2,), width=64, heads=4)
ORACLE_BONUS = 100.0  # added to the logits of the target's cells: they rank first
MACS_SAMPLES = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not RUN.is_dir():
        raise SystemExit(f"{RUN} is not trained: python benchmarks/vltp_tos.py trains it")
    data = make_dataset("tos", "val", size=args.samples, image_size=IMAGE_SIZES["tos"])
    shipped = load_reference("tos").eval()
    dense_macs = encoder_macs(shipped, data, MACS_SAMPLES)
    trained = load_reference("tos")
    patch_reference(trained, PAPER)
    load_trained(trained, RUN)
    trained.eval()
    decoder_state = ts.sieve_of(image_encoder(trained)).state_dict()
    mask_decoder = {key: value for key, value in trained.state_dict().items()
                    if key.startswith("sam.mask_decoder.")}

    def variant(method: ts.VLTP | None, fine_tuned: bool) -> torch.nn.Module:
        model = load_reference("tos").eval()
        if fine_tuned:
            model.load_state_dict(mask_decoder, strict=False)
        if method is not None:
            patch_reference(model, method).load_state_dict(decoder_state)
        return model

    rows = [("dense (shipped)", *_score(shipped, data), 1.0)]
    for name, method, fine_tuned, oracle in (
            ("the paper's recipe: block 3, keep 0.3, mask decoder trained", PAPER, True, False),
            ("the same, the target's cells kept first (oracle)", PAPER, True, True),
            ("its trained mask decoder on the unpruned map", None, True, False),
            ("its decoder at block 2, keep 0.42, the shipped mask decoder", EARLIER, False, False)):
        model = variant(method, fine_tuned)
        share = 1.0 if method is None else encoder_macs(model, data, MACS_SAMPLES) / dense_macs
        rows.append((name, *_score(model, data, oracle), share))
        print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/vltp_choice.py", *sys.argv[1:]])
    path = args.out / "vltp_choice-val"
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ("row", "gIoU", "target_cell_recall", "macs_share")
    record = {"command": command, "samples": len(data),
              "rows": [dict(zip(keys, row, strict=True)) for row in rows]}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# VLTP on tos: the paper's recipe taken apart on the validation split",
        "",
        f"Produced by `{command}` (the first {len(data)} validation sentences). Recall: the share of the "
        "target mask's cells that go on at the stage. MACs: the encoder's, decoder included, against "
        "dense.",
        "",
        "| row | gIoU | vs dense (points) | target-cell recall | MACs vs dense |",
        "|---|---|---|---|---|",
    ]
    dense = rows[0][1]
    for name, score, recall, share in rows:
        shown = "—" if recall is None else f"{recall:.3f}"
        lines.append(f"| {name} | {score:.4f} | {100 * (score - dense):+.2f} | {shown} | {share:.3f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(path.with_suffix(".md").read_text())


@torch.no_grad()
def _score(model: torch.nn.Module, data, oracle: bool = False) -> tuple[float, float | None]:
    """gIoU over `data`, and the share of the target's cells kept at VLTP's stage (None: unpruned)."""
    encoder = image_encoder(model)
    stage = None
    if ts.is_patched(encoder):
        sieve = ts.sieve_of(encoder)
        stage = next(iter(sieve.method.stages(sieve.spec)))  # the one stage of these VLTPs
    pairs, recalls = [], []
    for batch in DataLoader(data, batch_size=50, collate_fn=collate):
        grid = model.sam.config.vision_config.image_size // model.sam.config.vision_config.patch_size
        target = F.adaptive_avg_pool2d(batch["mask"].float()[:, None], (grid, grid)).flatten(1) > 0
        restore = _with_bonus(encoder, ORACLE_BONUS * target.float()) if oracle else None
        try:
            with ts.trace(encoder) if stage is not None else contextlib.nullcontext([]) as traces:
                predicted = model.predict(batch["image"], text=batch["text"])
        finally:
            if restore is not None:
                restore()
        pairs.append(intersection_union(predicted, batch["mask"]))
        if stage is not None:
            kept = torch.zeros_like(target, dtype=torch.float)
            kept.scatter_(1, traces[0].layers[stage].index, 1.0)
            recalls.append((kept * target).sum(1) / target.sum(1).clamp_min(1))
    intersections, unions = torch.cat([i for i, _ in pairs]), torch.cat([u for _, u in pairs])
    return giou(intersections, unions), (float(torch.cat(recalls).mean()) if recalls else None)


def _with_bonus(encoder: torch.nn.Module, bonus: torch.Tensor):
    """Add `bonus` [B, N] to the VLTP decoder's logits until the returned undo is called."""
    decoder = ts.sieve_of(encoder).parts[0]["decoder"]
    forward = decoder.forward
    decoder.forward = lambda features, guidance: forward(features, guidance) + bonus
    return lambda: delattr(decoder, "forward")


if __name__ == "__main__":
    main()

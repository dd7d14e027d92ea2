"""Is the working tree faster than an earlier commit? Both patch the same model in one process.

Run-to-run noise on a shared CPU (a few hundredths of a speedup) hides the small gains of most
changes, so two separate `benchmarks/speed.py` runs cannot tell them apart. This script
extracts `src/tokensieve` at COMMIT into a temporary directory under another package name,
imports it next to the working tree's tokensieve, and times dense, the commit's pruned model and
the working tree's pruned model interleaved (the order rotating each round), after warm-up, as
medians. The methods are the CLI's specs. For each method it also gives the working tree's
gain over the commit, round by round (the commit's time / the working tree's, in the same
round), as the median and the quartiles: a change is within noise when 1.0 lies inside them.
With --out, the table is appended to a markdown file.

    python benchmarks/versus_commit.py HEAD~1 tome:r=13
    python benchmarks/versus_commit.py 405acc7 topk:keep=1.0 --batch 32 --repeats 8
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import tokensieve as ts
from tokensieve.loading import load_model, parse_method

ROOT = Path(__file__).resolve().parent.parent
OLD_NAME = "tokensieve_at_commit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", help="a git revision of this repository")
    parser.add_argument("methods", nargs="+", help="method specs, e.g. tome:r=13 evit:keep=0.7")
    parser.add_argument("--model", default="deit_small_patch16_224",
                        help="a timm model name or a transformers model directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        old = _import_at(args.commit, Path(tmp))
        model = load_model(args.model).eval()
        pixels = torch.randn(args.batch, 3, 224, 224)
        forwards = {"dense": model}
        for spec in args.methods:
            forwards[f"{spec} @ {args.commit}"] = _patched(old, model, spec)
            forwards[f"{spec} @ working tree"] = _patched(ts, model, spec)
        times = _times(forwards, pixels, args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = [f"{args.model}, batch {args.batch}, {args.threads} threads, fp32; medians of {args.repeats} "
             f"interleaved rounds (`python benchmarks/versus_commit.py {' '.join(sys.argv[1:])}`)", "",
             f"| method | {args.commit} ms | working tree ms | speedup over dense {args.commit} | "
             "speedup over dense, working tree | working tree gain: median (quartiles) |",
             "|---|---:|---:|---:|---:|---:|"]
    for spec in args.methods:
        old, new = times[f"{spec} @ {args.commit}"], times[f"{spec} @ working tree"]
        gains = [o / n for o, n in zip(old, new, strict=True)]
        low, _, high = statistics.quantiles(gains, n=4, method="inclusive")
        lines.append(f"| {spec} | {statistics.median(old) * 1e3:.1f} | {statistics.median(new) * 1e3:.1f} | "
                     f"{medians['dense'] / statistics.median(old):.3f}x | "
                     f"{medians['dense'] / statistics.median(new):.3f}x | "
                     f"{statistics.median(gains):.3f} ({low:.3f}–{high:.3f}) |")
    lines.append(f"\ndense (the host's forward): {medians['dense'] * 1e3:.1f} ms\n")
    print("\n".join(lines))
    if args.out is not None:
        with args.out.open("a") as out:
            out.write("\n".join(lines) + "\n")


def _import_at(commit: str, into: Path):
    """The package as it was at `commit`, importable as OLD_NAME."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/tokensieve"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / OLD_NAME
    (into / "src" / "tokensieve").rename(package)
    word = re.compile(r"\btokensieve\b")
    for source in package.rglob("*.py"):
        source.write_text(word.sub(OLD_NAME, source.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(OLD_NAME)


def _patched(library, model: torch.nn.Module, spec: str) -> torch.nn.Module:
    method = parse_method(spec)
    method = getattr(library, type(method).__name__)(**vars(method))  # the same config, that version's class
    pruned = copy.deepcopy(model)
    library.patch(pruned, method)
    return pruned


def _times(forwards: dict, pixels: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    names = list(forwards)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for net in forwards.values():
            for _ in range(3):
                net(pixels)
        for i in tqdm(range(repeats), desc="rounds"):
            for name in names[i % len(names):] + names[: i % len(names)]:
                start = time.perf_counter()
                forwards[name](pixels)
                times[name].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()

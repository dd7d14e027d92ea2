"""Is the working tree faster than an earlier commit? Both patch the same model in one process.

Run-to-run noise on a shared CPU (a few hundredths of a speedup) hides the small gains of most
changes, so two separate `benchmarks/speed.py` runs cannot tell them apart. This script
extracts `src/tokensieve` at COMMIT into a temporary directory under another package name,
imports it next to the working tree's tokensieve, and times dense, the commit's pruned model and
the working tree's pruned model interleaved (the order rotating each round), after warm-up, as
medians. The methods are the CLI's specs.

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
        medians = _medians(forwards, pixels, args.repeats)
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, fp32; medians of {args.repeats} "
          f"interleaved rounds")
    for name, seconds in medians.items():
        print(f"{name:40s} {seconds * 1e3:8.1f} ms   speedup {medians['dense'] / seconds:.3f}x")


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


def _medians(forwards: dict, pixels: torch.Tensor, repeats: int) -> dict[str, float]:
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
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()

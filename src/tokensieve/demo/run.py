"""`tokensieve demo`: each shipped method on its task's reference model, beside dense and the
training-free baselines of its comparison, scored on a fixed slice of the test split by the code
that scores the committed full results (`reference.compare.score_row`), timed, and drawn."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import tokensieve as ts
from tokensieve.bench import interleaved_times
from tokensieve.demo import curves, pictures
from tokensieve.demo.cases import CASES, Case
from tokensieve.demo.keep_maps import KeptTokens, kept_tokens
from tokensieve.demo.pictures import Picture
from tokensieve.demo.report import write_page
from tokensieve.loading import parse_method
from tokensieve.methods import Method
from tokensieve.reference.compare import score_row, scored_model
from tokensieve.reference.evaluation import METRICS, predict
from tokensieve.reference.models import IMAGE_SIZES
from tokensieve.reference.shipped_methods import shipped_by_name
from tokensieve.tasks import collate, make_dataset

DEFAULT_SAMPLES = 100  # the first samples of each test split
TIMING_BATCH = 8  # samples of the slice each timed forward takes
TIMING_ROUNDS = 5
SHOWN = 2  # samples whose keep maps are drawn
SENTENCES = 4  # tos: sentences of one image drawn


@dataclass
class DemoRow:
    task: str
    method: str
    metric: str
    score: float
    relative: float  # score / dense score - 1
    gmacs: float  # per sample: the encoder's; nlvr, retrieval: both towers'
    macs_share: float  # of dense
    pruning_speedup: float | None  # the same patched model with pruning disabled / pruned
    host_speedup: float | None  # the unpatched model / pruned
    kind: str  # "dense", "shipped" (trained, as the package ships it) or "training-free"


@dataclass
class DemoReport:
    rows: list[DemoRow]
    pictures: list[Picture]
    page: Path
    samples: int
    timing_batch: int
    timing_rounds: int
    threads: int
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict:
        return {"rows": [asdict(row) for row in self.rows], "page": str(self.page),
                "pictures": [str(p.path) for p in self.pictures], "samples": self.samples,
                "timing_batch": self.timing_batch, "timing_rounds": self.timing_rounds,
                "threads": self.threads, "seconds": self.seconds, "notes": self.notes}


def run_demo(out: str | Path = "tokensieve-demo", samples: int = DEFAULT_SAMPLES,
             tasks: tuple[str, ...] = tuple(CASES), timing_batch: int = TIMING_BATCH,
             timing_rounds: int = TIMING_ROUNDS, progress: bool = True) -> DemoReport:
    """Run the demo on `tasks` over the first `samples` test samples of each, and write its report
    folder `out`: index.html, the pictures as PNGs, and demo.json with the table."""
    unknown = [task for task in tasks if task not in CASES]
    if unknown:
        raise ValueError(f"no demo for {', '.join(unknown)}; choose among {', '.join(CASES)}")
    if samples < SHOWN or timing_batch < 1 or timing_rounds < 1:
        raise ValueError(f"samples must be at least {SHOWN}, timing_batch and timing_rounds at least 1")
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [CASES[task] for task in tasks]
    plans = {case.task: _methods(case) for case in cases}
    bar = tqdm(total=sum(len(plan) for plan in plans.values()), desc="demo", unit="model",
               disable=not progress)
    rows: list[DemoRow] = []
    drawn: list[Picture] = []
    notes: list[str] = []
    for case in cases:
        data = make_dataset(case.task, "test", size=samples, image_size=IMAGE_SIZES[case.task])
        timed = collate([data[i] for i in range(min(timing_batch, len(data)))])
        shown = collate([data[i] for i in range(SHOWN)])
        kept: list[tuple[str, KeptTokens]] = []
        dense = None
        for kind, method in plans[case.task]:
            bar.set_postfix_str(f"{case.task}: {'dense' if method is None else method}")
            model = scored_model(case.task, method).eval()
            row = score_row(model, case.task, "dense" if method is None else str(method), data,
                            None if dense is None else dense.score, progress=False)
            dense = dense or row
            speed = (None, None) if method is None else _speedups(model, case.task, timed, timing_rounds)
            rows.append(DemoRow(case.task, row.method, row.metric, row.score, row.relative, row.gmacs,
                                row.gmacs / dense.gmacs, *speed, kind))
            if method is not None:
                label = f"{type(method).__name__}{' (shipped)' if kind == 'shipped' else ''}"
                kept.append((label, kept_tokens(model, case.task, shown, case.blocks, case.text_blocks)))
                if case.task == "tos" and kind == "shipped":
                    drawn.append(_sentences(out, data, model, case))
            bar.update()
        notes += [f"{case.task}: {name} is not shipped trained for this task; its row is left out"
                  for name in case.shipped if shipped_by_name(case.task, name) is None]
        drawn += _pictures(out, case, shown, kept, METRICS[case.task], notes)
    bar.close()
    seconds = time.perf_counter() - start
    report = DemoReport(rows, drawn, out / "index.html", samples, timing_batch, timing_rounds,
                        torch.get_num_threads(), seconds, notes)
    write_page(report)
    return report


def _methods(case: Case) -> list[tuple[str, Method | None]]:
    """Dense, the shipped methods (those stored in this package), then the baselines."""
    shipped = [("shipped", method) for name in case.shipped
               if (method := shipped_by_name(case.task, name)) is not None]
    return [("dense", None), *shipped, *(("training-free", parse_method(spec)) for spec in case.baselines)]


def _speedups(model: nn.Module, task: str, batch: dict, rounds: int) -> tuple[float, float]:
    """(pruning's own speedup, the speedup over the unpatched model) of `model`'s task forward on
    `batch`: medians of interleaved rounds after one warm-up round."""
    host = copy.deepcopy(model)
    for module in list(host.modules()):
        if ts.is_patched(module):
            ts.unpatch(module)
    patched = [module for module in model.modules() if ts.is_patched(module)]

    def unpruned() -> None:
        with contextlib.ExitStack() as stack:
            for module in patched:
                stack.enter_context(ts.pruning_disabled(module))
            predict(model, task, batch)

    runs: dict[str, Callable[[], object]] = {
        "host": lambda: predict(host, task, batch), "unpruned": unpruned,
        "pruned": lambda: predict(model, task, batch)}
    with torch.inference_mode():
        times = {name: statistics.median(values) for name, values in interleaved_times(runs, rounds).items()}
    return times["unpruned"] / times["pruned"], times["host"] / times["pruned"]


def _sentences(out: Path, data, model: nn.Module, case: Case) -> Picture:
    """tos: the first image of the slice under its sentences (up to SENTENCES), VLTP's kept cells."""
    first = data[0]["image_index"]
    items = [data[i] for i in range(len(data)) if data[i]["image_index"] == first][:SENTENCES]
    batch = collate(items)
    block = case.blocks[-1]
    kept = kept_tokens(model, case.task, batch, (block,))
    return pictures.sentences(
        out / "tos_sentences.png", f"VLTP (shipped): one image, {len(items)} sentences", items[0]["image"],
        [item["text"] for item in items], batch["mask"], kept, block,
        f"VLTP on tos: the same image under {len(items)} sentences; top: the sentence's target, bottom: the "
        f"cells that ran block {block} under it (the others frozen, veiled).")


def _pictures(out: Path, case: Case, shown: dict, kept: list[tuple[str, KeptTokens]], metric: str,
              notes: list[str]) -> list[Picture]:
    drawn = [pictures.keep_maps(
        out / f"{case.task}_keep_maps.png", f"{case.task}: tokens each method kept", shown["image"], kept,
        case.blocks,
        f"{case.task}: per method (rows), the first {SHOWN} test images, then the image tokens that ran each "
        f"of blocks {', '.join(map(str, case.blocks))} as tokens of their own (the others veiled: pruned, "
        "frozen or merged into another).")]
    with_text = [(label, tokens) for label, tokens in kept if tokens.text]
    for label, tokens in with_text:
        name = label.split()[0].lower()
        drawn.append(pictures.text_tokens(
            out / f"{case.task}_{name}_text_tokens.png", f"{case.task}: text tokens {label} kept",
            shown["text"], tokens,
            f"{case.task}: the words of each text that ran each block shown of the text tower under {label} "
            "(dark: a token of its own; pale: merged into the fused token)."))
    rows = curves.committed_rows(case)
    if rows is None:
        notes.append(f"{case.task}: no committed results at {curves.RESULTS / case.results}; no curve drawn")
    else:
        drawn.append(curves.curve(
            out / f"{case.task}_curve.png", case, rows, metric,
            f"{case.task}: {metric} against GMACs per sample of every method in the committed full "
            f"comparison (benchmarks/results/{case.results}, test split); red crosses: the papers' claimed "
            "operating points carried over to our dense model."))
    return drawn

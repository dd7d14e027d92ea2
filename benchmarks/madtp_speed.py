"""MADTP's speed on BLIP-base-sized towers (random weights): both towers pruned per instance.

The model is transformers' `BlipForImageTextRetrieval` (the nlvr reference model's class) at
BLIP-base size: a ViT-B/16 vision tower at 384×384 (577 tokens, 12 layers, width 768) and a
12-layer BERT-base text encoder cross-attending to the image tokens, on texts of 20 to 35 tokens
(a padded batch). MADTP (100 alignment tokens, every layer of both towers, ragged per-instance
counts) has its T set on the timed batch so that both towers together spend `--budget` of their
dense MACs (default 0.3: −70%, the paper's operating point; with random weights any T > 0
already spends under half).

Three forwards of the whole model (image–text matching score) are timed on the same batch,
interleaved after warm-up, and their medians compared (fp32, `--threads` threads): the host's own
forward, the patched towers with pruning disabled, and pruned. Pruning's own speedup is the
unpruned time over the pruned; its efficiency is that speedup over the MACs ratio (both towers,
MADTP's own work included). Each batch is timed twice: plain, and with the patched towers inside
`ts.prepacked` (their linear layers on weights laid out once for oneDNN); the host always runs its
own forward. The issue's bars: ≥ 0.9 at batch 1, ≥ 0.85 at batch 8. Never run it beside other work.
Writes benchmarks/results/madtp_speed.md and .json ("-quick" with fewer rounds).

    python benchmarks/madtp_speed.py            # 10 rounds per row (about 30 minutes on 2 cores)
    python benchmarks/madtp_speed.py --quick    # 3 rounds
    python benchmarks/madtp_speed.py --breakdown   # where the pruned forward's time goes (3 minutes)

`--breakdown` writes madtp_speed_breakdown.md: per batch, the share of the pruned forward spent in
MADTP's own steps (scores, importance, threshold, merge: `ts.method_timing`), each tower's time
and MACs unpruned and pruned (which tower falls short of its MACs ratio), the tokens each
layer of both towers runs, and what one of the towers' linear layers (768 → 3072) does per
second at those token counts against the dense count: at batch 1 a pruned layer runs tens of
tokens, where a matrix product reads its weights for little work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve import calls
from tokensieve.bench import interleaved_times, machine
from tokensieve.patch import method_timing
from tokensieve.reference.vl import START_ID, build_nlvr, nlvr_config

IMAGE = 384
WIDTH = 768
TEXT_LENGTHS = (20, 35)  # tokens per text, inclusive
TARGET_EFFICIENCY = {1: 0.9, 8: 0.85}
STATES = ("unpruned", "pruned")


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=12, num_hidden_layers=12)
    config = nlvr_config(vision={**base, "image_size": IMAGE}, text={**base, "encoder_hidden_size": WIDTH},
                         projection=256)
    return build_nlvr(config).eval()


def inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and texts of 20 to 35 tokens (right-padded to the longest; the ids are the
    reference models' words, whose vocabulary is small: the embedding costs no MACs either way)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(TEXT_LENGTHS[0], TEXT_LENGTHS[1] + 1, (batch,), generator=generator)
    width = int(lengths.max())
    ids = torch.randint(1, START_ID, (batch, width), generator=generator)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),
            "input_ids": ids * mask, "attention_mask": mask}


def towers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.vision_model, model.text_encoder]


def measure(batch: int, budget: float, rounds: int, warmup: int, prepack: bool) -> dict:
    host = build()
    pruned = copy.deepcopy(host)
    ts.patch(towers(pruned), ts.MADTP())
    given = inputs(batch)
    calibration = ts.calibrate_temperature(pruned, [given], macs_budget=budget)
    macs = sum(report.macs for report in ts.tower_flops(pruned, towers(pruned), given))
    dense = sum(report.macs for report in ts.tower_flops(host, towers(host), given))

    def unpruned() -> None:
        with contextlib.ExitStack() as stack:
            for tower in towers(pruned):
                stack.enter_context(ts.pruning_disabled(tower))
            pruned(**given)

    runs = {"host": lambda: host(**given), "unpruned": unpruned, "pruned": lambda: pruned(**given)}
    with torch.inference_mode(), ts.prepacked(pruned) if prepack else contextlib.nullcontext():
        times = interleaved_times(runs, rounds, warmup)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    flops_ratio = dense / macs
    pruning_speedup = ms["unpruned"] / ms["pruned"]
    result = {
        "batch": batch, "prepacked": prepack, "budget": budget, "temperature": calibration.temperature,
        "rounds": rounds,
        "host_ms": ms["host"], "unpruned_ms": ms["unpruned"], "pruned_ms": ms["pruned"],
        "gmacs": macs / 1e9, "dense_gmacs": dense / 1e9, "flops_ratio": flops_ratio,  # per sample
        "speedup": ms["host"] / ms["pruned"], "pruning_speedup": pruning_speedup,
        "efficiency": pruning_speedup / flops_ratio, "target_efficiency": TARGET_EFFICIENCY[batch],
    }
    print(result, flush=True)
    return result


def breakdown(batch: int, budget: float, rounds: int) -> dict:
    """The method's own share of the pruned forward, each tower's time and MACs unpruned and pruned,
    the mean tokens per layer of each tower, and a 768 → 3072 linear layer's throughput at the
    vision tower's pruned token counts."""
    host = build()
    pruned = copy.deepcopy(host)
    ts.patch(towers(pruned), ts.MADTP())
    given = inputs(batch)
    ts.calibrate_temperature(pruned, [given], macs_budget=budget)
    names = ("vision", "text")
    with ts.pruning_disabled(pruned.vision_model), ts.pruning_disabled(pruned.text_encoder):
        unpruned_macs = [report.macs for report in ts.tower_flops(pruned, towers(pruned), given)]
    pruned_macs = [report.macs for report in ts.tower_flops(pruned, towers(pruned), given)]
    shares = []
    spent: dict[str, list[float]] = {f"{state} {name}": [] for state in STATES for name in names}
    with torch.inference_mode():
        pruned(**given)
        for _ in range(rounds):
            with method_timing(pruned.vision_model) as vision, method_timing(pruned.text_encoder) as text:
                start = time.perf_counter()
                pruned(**given)
                total = time.perf_counter() - start
            shares.append((vision[0] + text[0]) / total)
            for state in STATES:
                with contextlib.ExitStack() as stack:
                    if state == "unpruned":
                        for tower in towers(pruned):
                            stack.enter_context(ts.pruning_disabled(tower))
                    times = stack.enter_context(_tower_times(dict(zip(names, towers(pruned), strict=True))))
                    pruned(**given)
                for name in names:
                    spent[f"{state} {name}"].append(times[name])
        with ts.trace(pruned.vision_model) as seen, ts.trace(pruned.text_encoder) as read:
            pruned(**given)
        host_text_ms = _host_text_ms(host, pruned, given, rounds)
    per_tower = {name: {"unpruned_ms": statistics.median(spent[f"unpruned {name}"]) * 1e3,
                        "pruned_ms": statistics.median(spent[f"pruned {name}"]) * 1e3,
                        "unpruned_gmacs": unpruned_macs[i] / 1e9, "pruned_gmacs": pruned_macs[i] / 1e9}
                 for i, name in enumerate(names)}
    per_layer = {name: [torch.as_tensor(record.mlp_tokens).float() for record in traces[0].layers]
                 for name, traces in (("vision", seen), ("text", read))}
    counts = {name: [float(c.mean()) for c in layers] for name, layers in per_layer.items()}
    longest = {name: [float(c.max()) for c in layers] for name, layers in per_layer.items()}
    linear = torch.nn.Linear(WIDTH, 4 * WIDTH)
    sizes = sorted({577, *(round(count) for count in counts["vision"])}, reverse=True)
    throughput, packed_throughput = {}, {}
    with torch.inference_mode(), ts.prepacked(linear):
        for tokens in sizes:
            x = torch.randn(batch * tokens, WIDTH)
            macs = batch * tokens * WIDTH * 4 * WIDTH
            throughput[tokens] = macs / median_seconds(partial(linear, x), rounds=9) / 1e9
            packed = median_seconds(partial(calls.linear, linear, x), rounds=9)
            packed_throughput[tokens] = macs / packed / 1e9
    text_weights = sum(m.weight.numel() * m.weight.element_size() for m in host.text_encoder.modules()
                       if isinstance(m, torch.nn.Linear))
    result = {"batch": batch, "budget": budget, "method_share": statistics.median(shares),
              "towers": per_tower, "host_text_ms": host_text_ms, "text_weight_mb": text_weights / 2**20,
              "tokens": counts,
              "longest": longest, "linear_gmacs_per_s": throughput,
              "prepacked_linear_gmacs_per_s": packed_throughput}
    print(result, flush=True)
    return result


def _host_text_ms(host: torch.nn.Module, pruned: torch.nn.Module, given: dict, rounds: int) -> float:
    """Median ms of the host's own (unpatched) text encoder on the image tokens the pruned vision
    tower returns: what the text encoder costs at those shapes, without MADTP."""
    with ts.trace(pruned.vision_model) as traces:
        image = pruned.vision_model(pixel_values=given["pixel_values"]).last_hidden_state
    text = partial(host.text_encoder, input_ids=given["input_ids"], attention_mask=given["attention_mask"],
                   encoder_hidden_states=image, encoder_attention_mask=traces[-1].output_mask())
    return median_seconds(text, rounds) * 1e3


@contextlib.contextmanager
def _tower_times(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, float]]:
    """Seconds each module's forward took in the forward run inside the block (by name)."""
    times: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(
            lambda *_, name=name: starts.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda *_, name=name: times.__setitem__(name, time.perf_counter() - starts[name])))
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def median_seconds(run: Callable[[], object], rounds: int) -> float:
    """Median seconds of `run()` after a warm-up call."""
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.3, help="share of both towers' dense MACs")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (not for the docs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true",
                        help="where the pruned forward's time goes (madtp_speed_breakdown.md)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.setup = f"CPU: {machine()}"
    args.out.mkdir(parents=True, exist_ok=True)
    rounds, warmup = (3, 1) if args.quick else (10, 2)
    if args.breakdown:
        _write_breakdown([breakdown(batch, args.budget, rounds) for batch in TARGET_EFFICIENCY], args)
        return
    results = [measure(batch, args.budget, rounds, warmup, prepack)
               for batch in TARGET_EFFICIENCY for prepack in (False, True)]
    command = " ".join(["python benchmarks/madtp_speed.py", *sys.argv[1:]])
    budget = "" if args.budget == 0.3 else f"-{args.budget:g}"
    path = args.out / f"madtp_speed{'-quick' if args.quick else ''}{budget}"
    payload = {"command": command, "threads": args.threads, "setup": args.setup, "results": results}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(_markdown(results, command, args))
    print(path.with_suffix(".md").read_text())


def _markdown(results: list[dict], command: str, args: argparse.Namespace) -> str:
    lines = [
        "# MADTP's speed on BLIP-base-sized towers (random weights)",
        "",
        f"Produced by `{command}` (fp32, {args.threads} threads, medians of interleaved rounds after "
        f"warm-up; {args.setup}). "
        f"ViT-B/16 vision tower at {IMAGE}×{IMAGE} and a 12-layer BERT-base text encoder with "
        f"cross-attention, texts of {TEXT_LENGTHS[0]}–{TEXT_LENGTHS[1]} tokens; MADTP on both towers with "
        "per-instance counts, T set on the timed batch to the budget. GMACs per sample, both towers, "
        "MADTP's own work included. Efficiency: pruning's own speedup (against the same patched towers "
        "with pruning disabled) over the MACs ratio. *Prepacked*: the patched towers (unpruned and pruned) "
        "ran inside `ts.prepacked`, their linear layers on weights laid out once for oneDNN's product; "
        "the host always runs its own forward.",
        "",
        "| batch | prepacked | T | GMACs | dense GMACs | MACs ratio | host ms | unpruned ms | pruned ms | "
        "speedup over the host | pruning's own speedup | efficiency | bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        met = "met" if r["efficiency"] >= r["target_efficiency"] else "not met"
        prepacked = "yes" if r["prepacked"] else "no"
        lines.append(f"| {r['batch']} | {prepacked} | {r['temperature']:.3g} | {r['gmacs']:.2f} | "
                     f"{r['dense_gmacs']:.2f} | {r['flops_ratio']:.2f}× | {r['host_ms']:.0f} | "
                     f"{r['unpruned_ms']:.0f} | {r['pruned_ms']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['pruning_speedup']:.2f}× | {r['efficiency']:.2f} | "
                     f"≥ {r['target_efficiency']}: {met} |")
    return "\n".join(lines) + "\n"


def _write_breakdown(results: list[dict], args: argparse.Namespace) -> None:
    command = " ".join(["python benchmarks/madtp_speed.py", *sys.argv[1:]])
    lines = [
        "# Where MADTP's pruned forward spends its time (BLIP-base-sized towers, random weights)",
        "",
        f"Produced by `{command}` (fp32, {args.threads} threads; {args.setup}; the towers and texts of "
        "madtp_speed.md, "
        f"T set on the batch to {args.budget:g} of both towers' dense MACs). *Method share*: MADTP's own "
        "steps (alignment scores, importance, threshold, merge) over the pruned forward's time, median over "
        "rounds. *Towers*: each tower's own forward timed inside the whole model's, unpruned (pruning "
        "disabled) and pruned, medians over rounds, beside its MACs per sample (MADTP's own work "
        "included); a tower's efficiency is its speedup over its MACs ratio. "
        "*Tokens*: the mean tokens each layer's MLP ran, per sample, and the most any sample of "
        "the batch ran (the ragged batch's padded length). *Linear*: a 768 → 3072 "
        "layer (one of the towers' MLP products) timed alone on batch × tokens rows: GMAC/s at each "
        "vision layer's pruned count against the dense 577, plain and on its prepacked weight "
        "(`ts.prepacked`).",
        "",
    ]
    for r in results:
        dense, packed = r["linear_gmacs_per_s"][577], r["prepacked_linear_gmacs_per_s"]
        lines += [
            f"## Batch {r['batch']}",
            "",
            f"Method share of the pruned forward: {r['method_share']:.1%}.",
            "",
            "| tower | unpruned ms | pruned ms | speedup | unpruned GMACs | pruned GMACs | MACs ratio | "
            "efficiency |",
            "|---|---|---|---|---|---|---|---|",
            *(_tower_row(name, t) for name, t in r["towers"].items()),
            "",
            f"The host's own text encoder (unpatched) on the image tokens the pruned vision tower returns: "
            f"{r['host_text_ms']:.0f} ms. Its linear layers' weights: {r['text_weight_mb']:.0f} MB, read "
            "once per forward whatever the tokens.",
            "",
            "| tower | tokens per layer: mean | longest sample |",
            "|---|---|---|",
            *(f"| {tower} | {', '.join(f'{c:.0f}' for c in counts)} | "
              f"{', '.join(f'{c:.0f}' for c in r['longest'][tower])} |"
              for tower, counts in r["tokens"].items()),
            "",
            "| tokens | linear GMAC/s | of dense | prepacked GMAC/s | of dense (plain) |",
            "|---|---|---|---|---|",
            *(f"| {tokens} | {speed:.1f} | {speed / dense:.2f} | {packed[tokens]:.1f} | "
              f"{packed[tokens] / dense:.2f} |" for tokens, speed in r["linear_gmacs_per_s"].items()),
            "",
        ]
    path = args.out / f"madtp_speed_breakdown{'-quick' if args.quick else ''}.md"
    path.write_text("\n".join(lines))
    print(path.read_text())


def _tower_row(name: str, t: dict) -> str:
    speedup = t["unpruned_ms"] / t["pruned_ms"]
    ratio = t["unpruned_gmacs"] / t["pruned_gmacs"]
    return (f"| {name} | {t['unpruned_ms']:.0f} | {t['pruned_ms']:.0f} | {speedup:.2f}× | "
            f"{t['unpruned_gmacs']:.2f} | {t['pruned_gmacs']:.2f} | {ratio:.2f}× | {speedup / ratio:.2f} |")


if __name__ == "__main__":
    main()

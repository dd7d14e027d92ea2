"""Setting the thresholds of a method that keeps the tokens rated above them (SViT's gates, VLTP
with `by_threshold`) on validation data: each stage keeps its target share of the patch tokens, or
the whole patched module meets a MACs budget.

Give it validation data, never the test split: the thresholds are fitted to the data they see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve import patch
from tokensieve.flops import report_from_trace
from tokensieve.methods.thresholds import SCORE_REPORT
from tokensieve.modes import in_mode
from tokensieve.patch import call_input_names, is_patched, runner_of, sieve_of, trace
from tokensieve.tokens import Trace, per_sample

Batches = Callable[[], Iterator[Any]]  # a fresh pass over the data's model inputs


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` set, and what it measured on the data with it; one entry per stage, in
    block order."""

    layers: tuple[int, ...]
    targets: tuple[float, ...]  # the share of each image's patch tokens each stage was set to keep
    thresholds: tuple[float, ...]  # keep probabilities, now in the method's threshold buffers
    shares: tuple[float, ...]  # the share of the data's patch tokens each stage kept with them
    macs: float  # MACs per sample of the patched module on the data, gates and decoders included
    dense_macs: float  # the same with every token kept and no gate or decoder
    scale: float  # the factor on the schedule's targets (1.0 unless a MACs budget was given)


def calibrate(model: nn.Module, data: Tensor | Mapping[str, Tensor] | Iterable[Any], *,
              macs_budget: float | None = None, batch_size: int = 16, tolerance: float = 0.01,
              max_rounds: int = 20) -> Calibration:
    """Set the threshold of every stage of the method patched in `model` (the patched module, or a
    model containing it) on validation `data`, stage by stage in block order, since each stage
    scores the tokens the earlier ones left: stage i keeps, over all of the data, its target share
    of the patch tokens (the quantile of its keep probabilities over every candidate token of the
    data). The method is one that keeps the tokens rated above thresholds (`reads_thresholds`):
    SViT, or VLTP with `by_threshold=True`.

    The targets are the method's (`threshold_targets`: SViT's schedule keep, keep², keep³;
    VLTP's keep per stage). With `macs_budget` (a share of the patched module's dense MACs, as
    `tokensieve.flops` counts them, gates included) one factor on all the targets is searched
    (false position, from the targets' own factor 1) until the module's MACs per sample on the
    data lie within `tolerance` (relative) of the budget, or `max_rounds` are spent (the closest
    is kept). Each setting of the thresholds runs the data once per stage and once more to
    measure, so a budget costs that many passes per trial (usually 3-5).

    `data` is a tensor of inputs (split into `batch_size` batches), a dict of keyword inputs (one
    batch), or a re-iterable of batches (a list, a DataLoader), each a tensor, a dict of keyword
    inputs or an (inputs, targets) pair. A dict's entries named as the method's per-call inputs
    (VLTP's `guidance`) are given through `tokensieve.inputs`, the rest to the model. Use the
    validation split: the thresholds fit the data they are set on, and setting them on the test
    split would score the model on its own fit.
    """
    module = _thresholded_module(model)
    if macs_budget is not None and not 0.0 < macs_budget <= 1.0:
        raise ValueError(f"macs_budget={macs_budget}: give the share of the dense MACs to spend, in (0, 1]")
    runner = runner_of(module)
    targets = runner.method.threshold_targets(runner.host.spec)
    thresholds = runner.method.thresholds(runner.parts, runner.host.spec)
    batches = data_batches(data, batch_size)
    calibrate = _Calibration(model, module, thresholds, tuple(targets), tuple(targets.values()), batches)
    before = {layer: threshold.clone() for layer, threshold in thresholds.items()}
    try:
        with in_mode(model, training=False), torch.no_grad():
            if macs_budget is None:
                return calibrate.at(1.0)
            return calibrate.to_budget(macs_budget, tolerance, max_rounds)
    except BaseException:  # a calibration that fails leaves the thresholds as they were
        for layer, threshold in before.items():
            thresholds[layer].copy_(threshold)
        raise


@dataclass
class _Calibration:
    model: nn.Module
    module: nn.Module  # the patched module within it
    thresholds: dict[int, Tensor]  # each stage's, by block
    layers: tuple[int, ...]
    targets: tuple[float, ...]
    batches: Batches

    def at(self, scale: float) -> Calibration:
        """Thresholds set for the targets times `scale` (each at most 1), and their measure."""
        targets = tuple(min(1.0, scale * target) for target in self.targets)
        thresholds = []
        for layer, target in zip(self.layers, targets, strict=True):
            scores, patches = self._scores(layer)
            thresholds.append(_threshold(scores, patches, target))
            self.thresholds[layer].fill_(thresholds[-1])
        shares, macs, dense = self._measure()
        return Calibration(self.layers, targets, tuple(thresholds), shares, macs, dense, scale)

    def to_budget(self, budget: float, tolerance: float, max_rounds: int) -> Calibration:
        """The factor on the targets whose thresholds spend `budget` of the dense MACs: from the
        schedule (factor 1), secant steps on one side of the goal until a trial crosses it, then
        false position inside the bracket (MACs grow with the factor, nearly linearly). Each trial
        costs a pass per stage, so few trials matter more than a guaranteed halving."""
        top = 1.0 / min(self.targets)  # every target at 1: every token kept
        tried = [self.at(1.0)]
        goal = budget * tried[0].dense_macs
        under = over = None  # the latest trials spending less, and more, than the goal
        for _ in range(max_rounds):
            latest = tried[-1]
            if abs(latest.macs - goal) <= tolerance * goal:
                break
            if latest.macs < goal:
                under = latest
            else:
                over = latest
            if under is not None and over is not None:
                scale = _inside(under, over, goal)
            elif over is not None:  # spend less
                if over.scale == 0.0:
                    break  # one token per image at every stage spends more: refused below
                scale = max(0.0, _toward(tried, goal))
            else:  # spend more
                if under.scale >= top:
                    break  # every token kept spends less than the budget
                scale = min(top, _toward(tried, goal))
            tried.append(self.at(scale))
        best = min(tried, key=lambda result: abs(result.macs - goal))
        if under is None and best.macs > goal * (1 + tolerance):
            fewest = tried[-1] if tried[-1].scale == 0.0 else self.at(0.0)
            if fewest.macs > goal:
                share = fewest.macs / fewest.dense_macs
                raise ValueError(f"macs_budget={budget}: the fewest MACs these stages reach on this data are "
                                 f"{share:.3f} of dense (one token per image at every stage); give a budget "
                                 "at least that large")
            tried.append(fewest)
            best = min(tried, key=lambda result: abs(result.macs - goal))
        for layer, threshold in zip(self.layers, best.thresholds, strict=True):  # the best, not the last
            self.thresholds[layer].fill_(threshold)
        return best

    def _traces(self) -> Iterator[Trace]:
        """The trace of every call of the patched module over the data."""
        found = False
        for batch in self.batches():
            with trace(self.module) as traces:
                call_model(self.model, batch)
            found = found or bool(traces)
            yield from traces
        if not found:
            raise ValueError("the model's forward did not run the patched module; give the model whose "
                             "forward uses it")

    def _scores(self, layer: int) -> tuple[Tensor, int]:
        """The log-odds stage `layer` gives each token it may keep, over the data, and the data's
        patch tokens."""
        scores, patches = [], 0
        for record in self._traces():
            found = [s for s in record.reports.get(SCORE_REPORT, ()) if s.layer == layer]
            if not found:
                raise ValueError(f"the stage before block {layer} did not run; calibrate with the data the "
                                 "model runs on")
            stage = found[0]
            candidates = stage.scores if stage.candidates is None else stage.scores[stage.candidates]
            scores.append(candidates.flatten().double().cpu())
            patches += int(per_sample(stage.input_patches, record.batch).sum())
        return torch.cat(scores), patches

    def _measure(self) -> tuple[tuple[float, ...], float, float]:
        """Each stage's share of the data's patch tokens kept, and the MACs per sample (pruned and
        dense) of the patched module."""
        host = runner_of(self.module).host
        kept = torch.zeros(len(self.layers), dtype=torch.float64)
        patches, samples, macs, dense = 0, 0, 0.0, 0.0
        for record in self._traces():
            report = report_from_trace(host, record)
            macs += report.macs * record.batch
            dense += report.dense_macs * record.batch
            samples += record.batch
            patches += int(record.input_counts().sum()) - record.prefix * record.batch
            by_layer = {block.layer: block for block in record.layers}
            for i, layer in enumerate(self.layers):
                tokens = per_sample(by_layer[layer].attention_tokens, record.batch)  # after the stage
                kept[i] += float(tokens.sum()) - record.prefix * record.batch
        shares = tuple((kept / max(patches, 1)).tolist())
        return shares, macs / samples, dense / samples


def _toward(tried: list[Calibration], goal: float) -> float:
    """The next factor from trials all on one side of `goal`: the secant through the last two, or
    from one, the factor scaled by (goal / MACs)², which overshoots a proportional step (MACs hold
    a fixed part the factor does not scale)."""
    latest = tried[-1]
    if len(tried) >= 2:
        previous = tried[-2]
        slope = (latest.macs - previous.macs) / (latest.scale - previous.scale or 1e-12)
        if slope > 0:
            return latest.scale + (goal - latest.macs) / slope
    return latest.scale * (goal / latest.macs) ** 2


def _inside(under: Calibration, over: Calibration, goal: float) -> float:
    """The factor where MACs reach `goal` on the line through the two trials that bracket it,
    kept off the bracket's ends (a tenth of its width) so that it always narrows."""
    width = over.scale - under.scale
    share = (goal - under.macs) / max(over.macs - under.macs, 1e-12)
    return under.scale + width * min(max(share, 0.1), 0.9)


def _threshold(scores: Tensor, patches: int, target: float) -> float:
    """The keep probability that keeps round(target · patches) of `scores` (log-odds): halfway, in
    log-odds, between the last score kept and the first one not kept."""
    count = round(target * patches)
    if count >= scores.numel():
        return 0.0  # keep every candidate
    if count <= 0:
        return 1.0  # keep none but the one per image every stage keeps
    ranked = scores.sort(descending=True).values
    return float(torch.sigmoid((ranked[count - 1] + ranked[count]) / 2))


def _thresholded_module(model: nn.Module) -> nn.Module:
    patched = [m for m in model.modules() if is_patched(m)]
    found = [m for m in patched if sieve_of(m).method.reads_thresholds]
    if len(found) == 1:
        return found[0]
    if not found and patched:
        methods = ", ".join(dict.fromkeys(str(sieve_of(m).method) for m in patched))
        raise ValueError(f"{methods} keeps no tokens by thresholds: calibrate SViT (per_image=False, "
                         "sampled=False, keep < 1) or VLTP(by_threshold=True)")
    where = "no module" if not found else f"{len(found)} modules"
    raise ValueError(f"{where} of this model is patched with a method that keeps tokens by thresholds; "
                     "patch one module with tokensieve.patch(module, method) and calibrate the model that "
                     "runs it")


def data_batches(data: Any, batch_size: int) -> Batches:
    """Passes over `data`'s model inputs, as many as asked for."""
    if isinstance(data, Tensor):
        return lambda: iter(data.split(batch_size))
    if isinstance(data, Mapping):
        return lambda: iter([data])
    if iter(data) is data:
        raise ValueError("calibration runs the data once per stage: give a re-iterable (a list of batches, a "
                         "DataLoader, a tensor of inputs), not an iterator")
    return lambda: (item[0] if isinstance(item, (tuple, list)) else item for item in data)


def call_model(model: nn.Module, batch: Any) -> Any:
    """`model` on one batch; a dict's entries named as per-call inputs go through `inputs`."""
    if not isinstance(batch, Mapping):
        return model(batch)
    names = call_input_names(model)
    given = {name: value for name, value in batch.items() if name in names}
    if not given:
        return model(**batch)
    with patch.inputs(model, **given):
        return model(**{name: value for name, value in batch.items() if name not in names})


__all__ = ["Batches", "Calibration", "calibrate", "call_model", "data_batches"]

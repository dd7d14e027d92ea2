"""Setting MADTP's temperature T on validation data so that the towers it prunes together spend a
MACs budget: T is one scalar, and a higher T prunes more, so a bracket and bisection find it.

Give it validation data, never the test split: T is fitted to the data it sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokensieve.calibration import call_model, data_batches
from tokensieve.flops import report_from_trace
from tokensieve.methods.madtp import MADTP
from tokensieve.modes import in_mode
from tokensieve.patch import patched_within, runner_of, trace

FIRST_TEMPERATURE = 1.0  # the authors' starting T
MAX_DOUBLINGS = 24  # T up to 2^24: a budget below what that spends is out of reach
FLAT_DOUBLINGS = 3  # doublings in a row that spend no less: the budget is out of reach


class BudgetOutOfReach(ValueError):
    """No T makes the towers spend the MACs budget on the data (within the tolerance): a property of
    the trained towers and the data, not a wrong argument."""


@dataclass(frozen=True)
class TemperatureCalibration:
    """What `calibrate_temperature` set, and what the towers spend with it on the data."""

    temperature: float  # now in the bank's `temperature` buffer
    macs: float  # MACs per sample of the patched towers together, the method's overhead included
    dense_macs: float  # the same with every token kept (T = 0), in both towers
    rounds: int  # passes over the data the search took


def calibrate_temperature(model: nn.Module, data: Tensor | Mapping[str, Tensor] | Iterable[Any], *,
                          macs_budget: float, batch_size: int = 16, tolerance: float = 0.02,
                          max_rounds: int = 40, nearest: bool = False) -> TemperatureCalibration:
    """Set T of the MADTP patched in `model` (one tower, or the towers patched together, within
    `model`) so that on `data` the patched towers together spend `macs_budget` of their dense MACs
    per sample, within `tolerance` (relative), or as close as `max_rounds` passes get.

    A sample is one of the tower that runs fewest (NLVR's image tower runs two images a sentence:
    a sample is a sentence). T doubles from 1 until the budget is met, then bisection narrows the
    bracket; the closest T tried is kept. `data` is as `tokensieve.calibrate` reads it: a tensor of
    inputs, a dict of keyword inputs, or a re-iterable of batches.

    A budget no T reaches within `tolerance` is refused (`BudgetOutOfReach`), T left as it was;
    with `nearest`, T is set to the closest share it reached instead (a schedule of budgets, where
    near is enough).
    """
    if not 0.0 < macs_budget <= 1.0:
        raise ValueError(f"macs_budget={macs_budget}: give the share of the dense MACs to spend, in (0, 1]")
    towers, sieve = patched_within(model)
    if sieve is None or not isinstance(sieve.method, MADTP):
        raise ValueError("calibrate_temperature sets MADTP's T: patch the towers with "
                         "tokensieve.patch([...], MADTP()) first")
    buffer = sieve.shared["bank"].temperature
    before = buffer.clone()
    spend = _Spending(model, towers, data_batches(data, batch_size))
    try:
        with in_mode(model, training=False), torch.no_grad():
            return _search(spend, buffer, macs_budget, tolerance, max_rounds, nearest)
    except BaseException:  # a failed search leaves T as it was
        buffer.copy_(before)
        raise


@dataclass
class _Spending:
    model: nn.Module
    towers: list[nn.Module]
    batches: Any

    def at(self, buffer: Tensor, temperature: float) -> tuple[float, float]:
        """MACs and dense MACs per sample of the towers together with T = `temperature`."""
        buffer.fill_(temperature)
        macs = dense = 0.0
        rows = [0] * len(self.towers)
        for batch in self.batches():
            with contextlib.ExitStack() as stack:
                traces = [stack.enter_context(trace(tower)) for tower in self.towers]
                call_model(self.model, batch)
            for i, (tower, records) in enumerate(zip(self.towers, traces, strict=True)):
                host = runner_of(tower).host
                for record in records:
                    report = report_from_trace(host, record)
                    macs += report.macs * record.batch
                    dense += report.dense_macs * record.batch
                    rows[i] += record.batch
        ran = [count for count in rows if count]
        if not ran:
            raise ValueError("the model's forward ran none of the towers MADTP is patched on; give the model "
                             "whose forward runs them, and its inputs")
        samples = min(ran)
        return macs / samples, dense / samples


def _search(spend: _Spending, buffer: Tensor, budget: float, tolerance: float,
            max_rounds: int, nearest: bool) -> TemperatureCalibration:
    # The dense figure comes from a pass that prunes nothing (T = 0): a pruned pass counts a text
    # tower's cross-attention over the image tokens that survived, not over all of them.
    unpruned, dense = spend.at(buffer, 0.0)
    tried: list[tuple[float, float]] = [(0.0, unpruned)]  # (T, macs); T = 0 is a T too (budget 1)

    def trial(temperature: float) -> float:
        macs, _ = spend.at(buffer, temperature)
        tried.append((temperature, macs))
        return macs / dense

    if abs(unpruned / dense - budget) <= tolerance * budget:  # pruning nothing meets it
        buffer.fill_(0.0)
        return TemperatureCalibration(0.0, unpruned, dense, 1)
    low, high = 0.0, FIRST_TEMPERATURE  # low spends more than the budget, high (once found) less
    share = trial(high)
    doublings = flat = 0
    while share > budget * (1 + tolerance) and doublings < MAX_DOUBLINGS and len(tried) < max_rounds:
        before = share
        low, high = high, 2 * high
        share = trial(high)
        doublings += 1
        flat = flat + 1 if share >= before else 0
        if flat == FLAT_DOUBLINGS:  # no longer falling: each threshold has reached its mean importance
            break
    beyond = share > budget * (1 + tolerance)  # the most pruning T reaches is not enough
    if beyond and not nearest:
        raise BudgetOutOfReach(f"macs_budget={budget}: at T={high:g} these towers still spend {share:.3f} of "
                               "their dense MACs on this data (more T prunes no more); give a larger budget")
    while not beyond and abs(share - budget) > tolerance * budget and len(tried) < max_rounds:
        middle = (low + high) / 2
        share = trial(middle)
        if share > budget:
            low = middle
        else:
            high = middle
    temperature, macs = min(tried, key=lambda t: abs(t[1] / dense - budget))
    if abs(macs / dense - budget) > tolerance * budget and not nearest:
        # The share is a step function of T (a token more or less in a layer), and T > 0 prunes:
        # as T falls to 0 each threshold tends to the least importance an alignment token matches
        # best, which can already spend well under the dense MACs.
        above = min((m, t) for t, m in tried if m / dense > budget)
        below = max(((m, t) for t, m in tried if m / dense < budget), default=None)
        reached = f"T={above[1]:.4g} spends {above[0] / dense:.3f}" + (
            "" if below is None else f", T={below[1]:.4g} spends {below[0] / dense:.3f}")
        raise BudgetOutOfReach(f"macs_budget={budget}: no T spends it within {tolerance:.0%} on this data, "
                               f"the share jumps across it ({reached}); give a budget the towers reach")
    buffer.fill_(temperature)
    return TemperatureCalibration(temperature, macs, dense, len(tried))


__all__ = ["TemperatureCalibration", "calibrate_temperature"]

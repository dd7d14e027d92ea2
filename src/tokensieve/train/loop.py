"""fit: train a patched model's method (or the whole model) with pruning on, seeded and resumable."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import tokensieve as ts
from tokensieve.modes import in_mode
from tokensieve.patch import Sieve, patched_within
from tokensieve.tokens import Trace
from tokensieve.train import distributed as dist
from tokensieve.train.checkpoint import (
    RunPosition,
    check_checkpoint_dir,
    load_run,
    read_metadata,
    resume_checkpoint,
    save_run,
)
from tokensieve.train.config import TrainConfig
from tokensieve.train.data import epoch_batches, steps_per_epoch, to_device
from tokensieve.train.identity import weights_fingerprint
from tokensieve.train.log import JsonlLog, StepLog
from tokensieve.train.losses import distillation_loss, keep_ratio_loss, keep_ratio_stages, logits_of
from tokensieve.train.precision import autocast
from tokensieve.train.rng import capture_rng, derived_seed, restore_rng, seed_everything
from tokensieve.train.schedule import warmup_cosine

TaskLoss = Callable[[Tensor, Any], Tensor]  # (logits, targets) -> scalar
_FIXED_TERMS = ("loss", "loss_task", "loss_keep_ratio", "loss_distill")  # the terms fit computes itself
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    step: int  # optimiser steps done by the run so far, resumed ones included
    history: list[StepLog] = field(default_factory=list)  # the steps of this call
    checkpoint: Path | None = None  # the last checkpoint written by this call
    resumed_from: Path | None = None


def fit(model: nn.Module, data: Any, task_loss: TaskLoss, config: TrainConfig, *,
        sieve: Sieve | None = None, evaluate: Evaluate | None = None, until: int | None = None,
        logits_of: Callable[[Any], Tensor] = logits_of,
        collate_fn: Callable[[list], Any] | None = None,
        after_step: Callable[[nn.Module, int], None] | None = None) -> FitResult:
    """Train `model` (patched with a method) on `data` with pruning on; returns what was done.

    Each step runs the model in training mode (mask mode for learnable methods) and minimises
    task_weight · task_loss(logits, targets) + keep_ratio_weight · keep-ratio loss (methods with
    keep decisions) + distill_weight · KL to the same model run dense (pruning off, eval mode,
    no gradient) + the loss terms the method reports for the step's forward calls
    (`Method.losses`, e.g. an alignment loss over an image and a text tower patched together;
    logged by name). The patched part may be several modules of `model` patched by one call
    (`tokensieve.patch([vision, text], method)`): they train as one handle. `data` is a Dataset
    of (input, target) samples (fit shuffles it from the seed; exact resume), an iterable of
    (inputs, targets) batches, or a function epoch -> such an iterable; dict inputs are passed as
    keyword arguments. With `checkpoint_dir` set the run checkpoints there and, with `resume`,
    continues from its latest checkpoint. `until` stops after that many steps of the run (the
    schedule still spans the whole run), to continue later. `sieve` picks the method when modules
    of `model` are patched by several calls. `evaluate(model)` runs
    in eval mode without gradient every `eval_every` steps and at the run's end (on every rank).
    `after_step(model, step)` runs after each optimiser step (the run's count so far), before that
    step's evaluation and checkpoint, e.g. to move a method's setting along a schedule; what it
    changes in the method's buffers is checkpointed with them.
    After fit, `.grad` of the trained parameters holds the last step's averaged, clipped gradient.
    """
    if config.checkpoint_dir is not None:
        check_checkpoint_dir(config.checkpoint_dir)
    patched, sieve = _find_patched(model, sieve, config)
    parameters = _trained_parameters(model, sieve, config)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if sieve is not None:
        sieve.to(device)  # the predictors live with the host from the start, as the optimiser needs
    epoch_length = steps_per_epoch(data, config.batch_size)
    total = _total_steps(config, epoch_length)
    stop = total if until is None else min(until, total)
    rank, world = dist.rank(), dist.world_size()

    with _training_mode(model, freeze_host=config.train == "method"):
        optimizer = _optimizer(parameters, config)
        resumed_from = _resume_point(config)
        if resumed_from is None:  # every rank starts from rank 0's host and method
            dist.broadcast_parameters([*model.parameters(), *(sieve.parameters() if sieve else ())])
        host_weights = weights_fingerprint(model) if config.train == "method" else None
        if resumed_from is not None:
            position = load_run(resumed_from, model=model, sieve=sieve, config=config,
                                named_parameters=parameters, optimizer=optimizer, host_weights=host_weights)
            _warn_if_config_changed(resumed_from, config)
            _restore_rank_rng(position, config.seed, rank, world)
        else:
            position = RunPosition(step=0, epoch=0, batch_in_epoch=0, rng=[])
            seed_everything(derived_seed(config.seed, "rank", rank))
        scheduler = warmup_cosine(optimizer, total, config.warmup_steps, config.min_lr_ratio, position.step)
        train_step = _TrainingStep(model, patched, sieve, task_loss, logits_of, config, parameters, optimizer,
                                   device)
        result = FitResult(step=position.step, resumed_from=resumed_from)

        log = None
        if config.log_path is not None and rank == 0:
            log = JsonlLog(config.log_path, resume_after=position.step if resumed_from is not None else None)
        bar = tqdm(total=total, initial=position.step, desc="train", dynamic_ncols=True,
                   disable=not config.progress or rank != 0)
        try:
            for batch, start in _batches(data, position, epoch_length, stop, config, rank, world, collate_fn):
                record = train_step.run(batch, position.epoch, scheduler)
                scheduler.step()
                position.step += 1
                position.batch_in_epoch += 1
                if epoch_length is not None and position.batch_in_epoch == epoch_length:
                    position.epoch, position.batch_in_epoch = position.epoch + 1, 0
                record.step, record.seconds = position.step, time.perf_counter() - start
                if after_step is not None:
                    after_step(model, position.step)
                if evaluate is not None and _due(position.step, config.eval_every, total):
                    record.eval = _evaluate(model, evaluate)
                result.history.append(record)
                if log is not None:
                    log.write(record)
                shown = {name: f"{value:.4f}" for name, value in (record.method_losses or {}).items()}
                bar.set_postfix(loss=f"{record.loss:.4f}", kept=f"{record.kept_rate:.3f}", **shown,
                                refresh=False)
                bar.update(1)
                if config.checkpoint_dir is not None and (
                        _due(position.step, config.checkpoint_every, total) or position.step == stop):
                    result.checkpoint = _save(config, model, sieve, parameters, optimizer, position,
                                              host_weights)
            result.step = position.step
            dist.barrier()  # every rank returns once rank 0's last checkpoint is on disk
        finally:
            bar.close()
            if log is not None:
                log.close()
    return result


@contextlib.contextmanager
def _training_mode(model: nn.Module, freeze_host: bool) -> Iterator[None]:
    """The model in training mode (mask mode for learnable methods), its parameters frozen when
    only the method trains; each parameter's flag and each sub-module's mode restored afterwards,
    even after an error."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        if freeze_host:
            for param in requires_grad:
                param.requires_grad_(False)
        with in_mode(model, training=True):
            yield
    finally:
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


class _TrainingStep:
    """One optimiser step: forward with pruning on (and the dense teacher), losses, backward,
    gradient averaging over ranks, clipping, update. Returns the step's StepLog (step and
    seconds filled in by the caller)."""

    def __init__(self, model: nn.Module, patched: list[nn.Module] | None, sieve: Sieve | None,
                 task_loss: TaskLoss, logits_of: Callable[[Any], Tensor], config: TrainConfig,
                 parameters: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.model, self.patched, self.sieve = model, patched, sieve
        self.task_loss, self.logits_of, self.config = task_loss, logits_of, config
        self.parameters = [p for _, p in parameters]
        self.optimizer, self.device = optimizer, device

    def run(self, batch: Any, epoch: int, scheduler: torch.optim.lr_scheduler.LRScheduler) -> StepLog:
        inputs, targets = to_device(batch, self.device)
        losses, traces = self._losses(inputs, targets)
        lr = self.config.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # the base lr of this step
        grad_norm = self._update(losses["loss"])
        # One reduction of every number logged, so that each is a mean over the global batch.
        names = [name for name, value in losses.items() if value is not None] + ["kept_rate"]
        values = [losses[name].detach().float() for name in names[:-1]] + [_kept_rate(traces).to(self.device)]
        # Every decision recorded, those a method weighs in its own loss too (keep_ratio_stages leaves
        # them out of the keep-ratio loss).
        decisions = [d.decisions for trace in traces for d in trace.keep_decisions]
        values += [d.detach().float().mean() for d in decisions]
        reduced = dist.mean_over_ranks(torch.stack(values)).tolist()
        means = dict(zip(names, reduced[: len(names)], strict=True))
        stage_shares = reduced[len(names) :] if decisions else None
        method_losses = {name.removeprefix("loss_"): means[name] for name in losses
                         if name not in _FIXED_TERMS} or None
        return StepLog(step=0, epoch=epoch, lr=lr, loss=means["loss"], loss_task=means["loss_task"],
                       loss_keep_ratio=means.get("loss_keep_ratio"), loss_distill=means.get("loss_distill"),
                       kept_rate=means["kept_rate"], keep_per_stage=stage_shares, grad_norm=float(grad_norm),
                       seconds=0.0, method_losses=method_losses)

    def _losses(self, inputs: Any, targets: Any) -> tuple[dict[str, Tensor | None], list[Trace]]:
        """The weighted loss and its terms (None: not computed) and the traces, under the config's
        precision."""
        with autocast(self.config.precision, self.device):
            return self._weighted_losses(inputs, targets)

    def _weighted_losses(self, inputs: Any, targets: Any) -> tuple[dict[str, Tensor | None], list[Trace]]:
        config = self.config
        if self.patched is None:  # a dense model: the task loss alone
            task = self.task_loss(self.logits_of(_call(self.model, inputs)), targets)
            return {"loss": config.task_weight * task, "loss_task": task, "loss_keep_ratio": None,
                    "loss_distill": None}, []
        teacher = self._teacher_logits(inputs) if config.distill_weight > 0 else None
        with contextlib.ExitStack() as stack:
            collected = [stack.enter_context(ts.trace(module)) for module in self.patched]
            logits = self.logits_of(_call(self.model, inputs))
        traces = [trace for collector in collected for trace in collector]
        if not traces:
            raise ValueError("the model's forward did not run the patched blocks; pass the model whose "
                             "forward uses them (or sieve=... for the patched part)")
        stages = keep_ratio_stages(traces)
        task = self.task_loss(logits, targets)
        keep = keep_ratio_loss(stages) if stages and config.keep_ratio_weight > 0 else None
        distill = None if teacher is None else distillation_loss(logits, teacher, config.distill_temperature)
        loss = config.task_weight * task
        if keep is not None:
            loss = loss + config.keep_ratio_weight * keep
        if distill is not None:
            loss = loss + config.distill_weight * distill
        terms = {"loss": loss, "loss_task": task, "loss_keep_ratio": keep, "loss_distill": distill}
        for name, value in self.sieve.method.losses(traces).items():
            key = f"loss_{name}"
            if key in terms:
                raise ValueError(f"{self.sieve.method} reports a loss named {name!r}, which fit computes "
                                 "itself; give it another name")
            loss = loss + value
            terms[key] = value
        terms["loss"] = loss
        return terms, traces

    def _update(self, loss: Tensor) -> Tensor:
        """Backward, average over ranks, clip, step; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.parameters)
        max_norm = self.config.grad_clip_norm if self.config.grad_clip_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        self.optimizer.step()
        return grad_norm

    @torch.no_grad()
    def _teacher_logits(self, inputs: Any) -> Tensor:
        """The same weights run dense in eval mode: a deterministic target that draws no random numbers."""
        with in_mode(self.model, training=False), contextlib.ExitStack() as stack:
            for module in self.patched:
                stack.enter_context(ts.pruning_disabled(module))
            return self.logits_of(_call(self.model, inputs)).detach()


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _kept_rate(traces: list[Trace]) -> Tensor:
    """Share of the input tokens (prefix included) still active after the last block, mean over
    samples and traced forwards. In mask mode the active tokens are the last keep decisions'."""
    if not traces:  # a dense model keeps every token
        return torch.tensor(1.0)
    rates = []
    for trace in traces:
        if trace.keep_decisions:
            kept = trace.prefix + trace.keep_decisions[-1].decisions.detach().float().sum(dim=1).cpu()
        else:
            kept = trace.kept_tokens()[-1].float()
        rates.append(kept.mean() / trace.input_tokens)
    return torch.stack(rates).mean()


def _find_patched(model: nn.Module, sieve: Sieve | None,
                  config: TrainConfig) -> tuple[list[nn.Module] | None, Sieve | None]:
    """The patched modules inside `model` (itself, or e.g. the towers of a task model) that one
    handle spans, and that handle; (None, None) for a model that is not patched, trained whole
    and dense."""
    if sieve is not None:
        patched = [m for m in model.modules() if ts.is_patched(m) and ts.sieve_of(m) is sieve]
        if not patched:
            raise ValueError("the given sieve is not attached to any module of this model")
    else:
        patched, sieve = patched_within(model)
    if not patched and config.train == "model":
        return None, None
    if not patched:
        raise ValueError("this model is not patched; call tokensieve.patch(model, method) before training "
                         "its method, or use TrainConfig(train='model') to train the model dense")
    return patched, sieve


def _trained_parameters(model: nn.Module, sieve: Sieve | None,
                        config: TrainConfig) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the optimiser updates; the names key the checkpoint."""
    if sieve is None:
        return [(f"model.{name}", p) for name, p in model.named_parameters() if p.requires_grad]
    parameters = [(f"sieve.{name}", p) for name, p in sieve.named_parameters()]
    if config.train == "method" and not parameters:
        raise ValueError(f"{sieve.method} has no parameters of its own to train; use "
                         "TrainConfig(train='model') to fine-tune the host with pruning on")
    if config.train == "model":
        parameters += [(f"model.{name}", p) for name, p in model.named_parameters() if p.requires_grad]
    return parameters


def _optimizer(parameters: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with four groups: the method's and the host's parameters (the host at
    lr · model_lr_scale), each split into matrices (decayed) and vectors (biases, norms: not)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in parameters:
        groups.setdefault((name.startswith("model."), param.ndim <= 1), []).append(param)
    param_groups = []
    for (is_host, is_vector), params in sorted(groups.items()):
        scale = config.model_lr_scale if is_host else 1.0
        param_groups.append({"params": params, "lr": config.lr * scale,
                             "weight_decay": 0.0 if is_vector else config.weight_decay})
    return torch.optim.AdamW(param_groups, lr=config.lr)


def _total_steps(config: TrainConfig, epoch_length: int | None) -> int:
    if config.steps is not None:
        return config.steps
    if epoch_length is None:
        raise ValueError("TrainConfig(epochs=...) needs data of known length (a Dataset, or an iterable "
                         "with len); give steps=... instead")
    total = config.epochs * epoch_length
    if config.warmup_steps > total:  # TrainConfig checks this when given steps
        raise ValueError(f"TrainConfig(warmup_steps={config.warmup_steps}): use at most the run's "
                         f"{total} steps ({config.epochs} epochs of {epoch_length}); a longer warm-up never "
                         "reaches lr")
    return total


def _batches(data: Any, position: RunPosition, epoch_length: int | None, stop: int, config: TrainConfig,
             rank: int, world: int, collate_fn: Callable[[list], Any] | None) -> Iterator[tuple[Any, float]]:
    """(batch, time its fetch began) for each step until `stop`, from where `position` stands;
    epochs roll over as the data runs out."""
    while position.step < stop:
        skip = position.batch_in_epoch
        batches = epoch_batches(data, position.epoch, skip, seed=config.seed, batch_size=config.batch_size,
                                rank=rank, world_size=world, num_workers=config.num_workers,
                                collate_fn=collate_fn)
        seen = 0
        while position.step < stop:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            seen += 1
            yield batch, start
        if position.step >= stop:
            return
        if seen == 0 and skip == 0:
            raise ValueError(f"epoch {position.epoch} of the data gave no batch; check the data")
        if epoch_length is None:  # an iterable of unknown length ended: that was the epoch
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _evaluate(model: nn.Module, evaluate: Evaluate) -> dict[str, float]:
    with in_mode(model, training=False), torch.no_grad():
        return {key: float(value) for key, value in evaluate(model).items()}


def _resume_point(config: TrainConfig) -> Path | None:
    if config.checkpoint_dir is None or not config.resume:
        return None
    return resume_checkpoint(config.checkpoint_dir)


def _warn_if_config_changed(path: Path, config: TrainConfig) -> None:
    metadata = read_metadata(path)
    # A field added since the checkpoint was written ran at its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {**defaults, **json.loads(metadata["train_config"])}
    current = json.loads(config.to_json())
    unused = {"resume", "progress"}
    if current["train"] == "method":
        unused.add("model_lr_scale")  # the host does not train: its lr was never used
    changed = sorted(k for k in current if k not in unused and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        warnings.warn(f"resuming {path} with a changed config ({details}); the run continues with the new "
                      "values, so it is no longer the run that was checkpointed", stacklevel=3)


def _restore_rank_rng(position: RunPosition, seed: int, rank: int, world: int) -> None:
    if len(position.rng) == world:
        restore_rng(position.rng[rank])
        return
    warnings.warn(f"the checkpoint was written by {len(position.rng)} processes and this run has {world}; "
                  "random draws (dropout, Gumbel noise) restart from the seed, so the run is not "
                  "bit-identical to an uninterrupted one", stacklevel=3)
    seed_everything(derived_seed(seed, "rank", rank, "step", position.step))


def _save(config: TrainConfig, model: nn.Module, sieve: Sieve | None,
          parameters: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
          position: RunPosition, host_weights: str | None) -> Path | None:
    """Every rank hands its RNG state to rank 0, which writes the checkpoint."""
    rng = dist.gather_objects(capture_rng())
    if dist.rank() != 0:
        return None
    snapshot = RunPosition(position.step, position.epoch, position.batch_in_epoch, rng)
    return save_run(config.checkpoint_dir, model=model, sieve=sieve, config=config,
                    named_parameters=parameters, optimizer=optimizer, position=snapshot,
                    host_weights=host_weights)


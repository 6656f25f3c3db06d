"""The fit loop, written once for every method and for stage 1.

``fit`` trains a model's trainable parameters to minimise an Objective with AdamW and a linear warm-up +
cosine schedule, evaluating after each epoch and keeping the best epoch. It writes the resume point every
--save-every steps and after each epoch, honours SIGINT / SIGTERM at a step boundary (after writing it),
and skips or stops on non-finite steps. ``run_stages`` runs a method's training as data: a list of Stage,
each one fit from the best weights so far.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from lowrank_train.checkpoint import load_checkpoint, save_checkpoint, trainable_state
from lowrank_train.config import TrainConfig
from lowrank_train.data import Batch, batches, epoch_order, step_draws, steps_per_epoch, to_device
from lowrank_train.distributed import average_gradients, is_main, sum_over_processes, world
from lowrank_util.errors import UserError
from lowrank_util.files import write_text

Scale = Callable[[torch.Tensor], torch.Tensor]  # the grad scaler's scale (identity unless fp16)
History = list[dict[str, float]]  # one row per epoch: epoch, loss, val_accuracy, seconds (and stage)


class Objective:
    """What fit minimises, one step at a time. ``backward`` leaves the step's gradients in ``.grad`` (by
    default ∇ scale(loss(batch)) under --precision's autocast); ``modify_gradients`` may change them before
    they are averaged over the processes and applied. ``batch`` holds "draws" (B, 2) beside the data
    (data.step_draws)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, batch: Batch, scale: Scale) -> torch.Tensor:
        """loss under --precision's autocast, then ∇ scale(loss); returns the loss."""
        with self.config.autocast(batch["label"].device):
            loss = self.loss(batch)
        scale(loss).backward()
        return loss

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called before epoch ``epoch`` (0-based) of a fit of ``epochs``, also on resuming into it: nothing by
        default."""

    def modify_gradients(self) -> None:
        """Called after backward, before the gradients are averaged over the processes: nothing by default."""


class LossFunction(Objective):
    """An Objective made of a plain loss function of the batch."""

    def __init__(self, config: TrainConfig, loss_fn: Callable[[Batch], torch.Tensor]) -> None:
        super().__init__(config)
        self.loss_fn = loss_fn

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(batch)


@dataclass
class Progress:
    """Where a fit stands: epochs done, steps done in the current one and their losses, the history
    (one row per epoch), the best epoch's validation accuracy and trainable tensors, bad steps skipped."""

    epoch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    history: History = field(default_factory=list)
    best_accuracy: float = -1.0
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_steps: int = 0


class NonFiniteError(UserError, FloatingPointError):
    """A step's loss or gradients were NaN/Inf more often than --max-bad-steps allows (a learning rate,
    precision or input to change: the message names the step, the tensors and the inputs)."""


class Interrupted(SystemExit):
    """SIGINT / SIGTERM honoured at a step boundary, after the resume point was written: exit 128 + signal."""


class StopSignals:
    """Within this block SIGINT and SIGTERM only record ``received``; fit stops at the next step boundary."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {s: signal.signal(s, self.record) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def record(self, signum: int, frame: Any) -> None:
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (the resume point will be written)")

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def non_finite(loss: float, params: dict[str, nn.Parameter], check_gradients: bool) -> list[str]:
    """What is NaN/Inf after a step's backward: the loss, then the gradients by parameter name."""
    problems = [] if math.isfinite(loss) else [f"loss {loss}"]
    if check_gradients:
        bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            problems.append(f"gradient of {len(bad)} tensors: {', '.join(bad[:8])}{', …' if len(bad) > 8 else ''}")
    return problems


def skip_or_stop(problems: list[str], batch: Batch, progress: Progress, config: TrainConfig, where: str) -> None:
    """Count a bad step; past --max-bad-steps raise NonFiniteError naming the step, the tensors and the inputs."""
    progress.bad_steps += 1
    inputs = [k for k, v in batch.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    message = f"{where}: non-finite {'; '.join(problems)}" + (
        f"; NaN/Inf in the input {', '.join(inputs)}" if inputs else ""
    )
    if progress.bad_steps > config.max_bad_steps:
        raise NonFiniteError(
            f"{message}. Stopped ({progress.bad_steps} bad steps, --max-bad-steps {config.max_bad_steps}); "
            "the last resume point written before this step is kept"
        )
    print(f"{message}: step skipped ({progress.bad_steps} of --max-bad-steps {config.max_bad_steps})")


def fit(
    model: nn.Module,
    objective: Objective,
    evaluate: Callable[[], float],
    data: Dataset,
    config: TrainConfig,
    epochs: int,
    lr: float,
    device: torch.device,
    checkpoint: Path | None = None,
    log: Callable[[History], None] | None = None,
    describe: str = "train",
) -> History:
    """Train ``model``'s trainable parameters to minimise ``objective`` with AdamW + warm-up/cosine. After
    each epoch, ``evaluate()`` gives the validation accuracy and ``log`` receives the history so far; the
    best epoch's trainable parameters are restored at the end.

    With ``checkpoint``, the state is written there every --save-every steps, after every epoch and on
    SIGINT/SIGTERM (then Interrupted is raised), and training resumes from it exactly if it exists.
    Returns one metrics dict per epoch."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=config.weight_decay)
    steps = steps_per_epoch(data, config)
    scheduler = cosine_schedule(optimizer, epochs * steps, config.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")  # skips inf steps itself
    stateful = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    progress = Progress(best=trainable_state(model))
    if checkpoint is not None and checkpoint.is_file():
        progress = Progress(**load_checkpoint(checkpoint, model, **stateful))
        print(f"{describe}: resumed from {checkpoint} at epoch {progress.epoch + 1} step {progress.step + 1}")
    with StopSignals() as stop:
        for epoch in range(progress.epoch, epochs):
            model.train()
            objective.begin_epoch(epoch, epochs)
            start = time.perf_counter()
            loader = batches(data, config, epoch_order(data, config, epoch, progress.step))
            bar = tqdm(
                loader, desc=f"{describe} epoch {epoch + 1}/{epochs}", leave=False, mininterval=5, disable=not is_main()
            )
            for step, batch in enumerate(bar, start=progress.step):
                batch = to_device(batch | {"draws": step_draws(config, epoch, step, len(batch["label"]))}, device)
                optimizer.zero_grad(set_to_none=True)
                loss = objective.backward(batch, scaler.scale)
                objective.modify_gradients()
                average_gradients(list(params.values()))
                totals = sum_over_processes(
                    torch.stack([loss.detach().float(), torch.tensor(float(stop.received), device=device)])
                )
                mean_loss, stopping = totals[0].item() / world()[1], bool(totals[1])
                problems = non_finite(mean_loss, params, check_gradients=not scaler.is_enabled())
                if problems:
                    where = f"{describe} epoch {epoch + 1} step {step + 1}/{steps}"
                    skip_or_stop(problems, batch, progress, config, where)
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    progress.losses.append(mean_loss)
                scheduler.step()
                progress.step = step + 1
                due = config.save_every and (epoch * steps + step + 1) % config.save_every == 0
                if checkpoint is not None and (due or stopping):
                    save_checkpoint(checkpoint, model, progress, config, **stateful)
                if stopping:
                    where = f"at epoch {epoch + 1} step {step + 1}" + (
                        f"; resume point {checkpoint}" if checkpoint else ""
                    )
                    print(f"{describe}: stopped {where}")
                    raise Interrupted(128 + (stop.received or signal.SIGTERM))
            model.eval()
            val = evaluate()
            loss = float(np.mean(progress.losses)) if progress.losses else math.nan
            progress.history.append(
                dict(epoch=epoch + 1, loss=loss, val_accuracy=val, seconds=time.perf_counter() - start)
            )
            if val > progress.best_accuracy:
                progress.best_accuracy, progress.best = val, trainable_state(model)
            progress.epoch, progress.step, progress.losses = epoch + 1, 0, []
            print(f"{describe} epoch {epoch + 1}/{epochs}: loss {loss:.4f}  val accuracy {val:.4f}")
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, progress, config, **stateful)
            if log is not None:
                log(progress.history)
    model.load_state_dict(progress.best, strict=False)
    return progress.history


@dataclass(frozen=True)
class Stage:
    """One fit of a method's training: ``epochs`` from the best weights so far, with a fresh optimiser and
    schedule, resuming from its own ``checkpoint`` file in the run folder. Before it, ``begin()`` runs
    (after the best weights are restored); during it, only the trainable parameters whose name ``trains``
    accepts are trained."""

    name: str  # shown in the progress lines
    epochs: int
    number: int | None = None  # recorded as "stage" in the metrics rows (None: the method's only fit)
    checkpoint: str = "state.pt"
    trains: Callable[[str], bool] = lambda name: True
    begin: Callable[[], None] = lambda: None


def run_stages(
    model: nn.Module,
    objective: Objective,
    stages: list[Stage],
    evaluate: Callable[[], float],
    data: Dataset,
    config: TrainConfig,
    device: torch.device,
    run_dir: Path,
) -> History:
    """Fit ``stages`` in turn (learning rate --lr), each from the best weights of the stages before it;
    returns one row per epoch, numbered across the stages (with the stage's number, where it has one), also
    written to run_dir/metrics.jsonl after every epoch. The best weights are kept."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    best_accuracy, best = -1.0, trainable_state(model)
    history: History = []
    for stage in stages:
        model.load_state_dict(best, strict=False)
        stage.begin()
        for name, p in trained.items():
            p.requires_grad_(stage.trains(name))

        before, tag = len(history), ({} if stage.number is None else {"stage": stage.number})
        log = partial(_write_metrics, run_dir / "metrics.jsonl", list(history), before, tag)
        rows = fit(
            model, objective, evaluate, data, config, stage.epochs, config.lr, device,
            checkpoint=run_dir / stage.checkpoint, log=log, describe=stage.name,
        )  # fmt: skip
        history += _numbered(rows, before, tag)
        for p in trained.values():
            p.requires_grad_(True)
        if rows and max(row["val_accuracy"] for row in rows) > best_accuracy:
            best_accuracy, best = max(row["val_accuracy"] for row in rows), trainable_state(model)
    model.load_state_dict(best, strict=False)
    return history


def _numbered(rows: History, before: int, tag: dict[str, int]) -> History:
    """A stage's rows with epochs counted on from ``before`` and the stage ``tag`` added."""
    return [row | dict(epoch=before + row["epoch"], **tag) for row in rows]


def _write_metrics(path: Path, earlier: History, before: int, tag: dict[str, int], rows: History) -> None:
    """metrics.jsonl: the rows of the stages before, then this stage's so far (main process only)."""
    if is_main():
        write_text(path, "".join(json.dumps(row) + "\n" for row in earlier + _numbered(rows, before, tag)))

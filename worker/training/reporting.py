"""What the loop tells its caller: progress, metric points, and the callbacks that get them."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from worker.training.checkpoint import LoopState
from worker.training.config import TrainConfig

Phase = Literal["loading", "training", "validating", "saving"]

PROGRESS_INTERVAL_S = 1.0
RUNNING_LOSS_STEPS = 50


@dataclass
class Progress:
    phase: Phase
    epoch: int  # 1-based: the epoch being trained or validated
    epochs: int
    step: int  # global optimizer step
    total_steps: int
    loss: float | None  # mean train loss of the last ~50 steps
    samples_per_second: float | None
    eta_seconds: float | None


@dataclass
class MetricPoint:
    """One value of a metric: ``train_loss`` per few steps; ``val_loss``, ``val_accuracy``,
    ``val_macro_f1`` and ``epoch`` per epoch."""

    name: str
    step: int
    value: float
    epoch: int


class Callbacks(Protocol):
    def on_progress(self, progress: Progress) -> None:
        """About once a second, and at every phase change."""

    def on_metrics(self, points: list[MetricPoint]) -> None:
        """New metric points, batched (about once a second and at each epoch end)."""

    def should_stop(self) -> bool:
        """Asked before every step and validation batch: keep it cheap. True cancels."""

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        """A checkpoint was written to ``local_dir`` after ``step``; upload it now.

        The directory is replaced by the next checkpoint.
        """


class Reporter:
    """Turns loop events into throttled ``on_progress`` and batched ``on_metrics`` calls.

    Step losses stay on the device until a flush (once a second, every ``log_every_steps``,
    at epoch end and before a checkpoint), so the GPU is not synchronised on every step.
    """

    def __init__(self, callbacks: Callbacks, config: TrainConfig) -> None:
        self.callbacks, self.config = callbacks, config
        self.total_steps = 0
        self.current_phase: Phase = "loading"
        self.last_progress = -math.inf
        self.pending_losses: list[torch.Tensor] = []
        self.recent_losses: deque[float] = deque(maxlen=RUNNING_LOSS_STEPS)
        self.window_sum, self.window_steps = 0.0, 0  # since the last train_loss point
        self.points: list[MetricPoint] = []
        # (time, step, samples) at recent steps of this training phase, for speed and ETA.
        self.clock: deque[tuple[float, int, int]] = deque(maxlen=RUNNING_LOSS_STEPS)
        self.samples = 0
        self.speed: float | None = None
        self.seconds_per_step: float | None = None

    def phase(self, phase: Phase, state: LoopState) -> None:
        self.current_phase = phase
        if phase == "training":
            self.clock.clear()
            self.clock.append((time.monotonic(), state.step, self.samples))
        self.progress(state)

    def step_done(self, state: LoopState, loss: torch.Tensor, samples: int) -> None:
        self.pending_losses.append(loss)
        self.samples += samples
        now = time.monotonic()
        self.clock.append((now, state.step, self.samples))
        if state.step % self.config.log_every_steps == 0:
            self.flush_losses(state)
            self.points.append(
                MetricPoint(
                    "train_loss", state.step, self.window_sum / self.window_steps, state.epoch + 1
                )
            )
            self.window_sum, self.window_steps = 0.0, 0
        if now - self.last_progress >= PROGRESS_INTERVAL_S:
            self.progress(state)

    def flush_losses(self, state: LoopState) -> None:
        if not self.pending_losses:
            return
        # In step order, so the epoch's running sum is the same however flushes fall.
        for value in torch.stack(self.pending_losses).float().tolist():
            self.recent_losses.append(value)
            self.window_sum += value
            self.window_steps += 1
            state.epoch_loss_sum += value
            state.epoch_loss_steps += 1
        self.pending_losses.clear()

    def epoch_metrics(self, state: LoopState, epoch: int, metrics: dict[str, float]) -> None:
        names = ("val_loss", "val_accuracy", "val_macro_f1")
        self.points += [
            MetricPoint(n, state.step, metrics[n], epoch) for n in names if n in metrics
        ]
        self.points.append(MetricPoint("epoch", state.step, float(epoch), epoch))
        self.flush_metrics()

    def flush_metrics(self) -> None:
        if self.points:
            points, self.points = self.points, []
            self.callbacks.on_metrics(points)

    def progress(self, state: LoopState) -> None:
        self.flush_losses(state)
        self.last_progress = time.monotonic()
        if self.current_phase == "training" and len(self.clock) >= 2:
            (t0, step0, samples0), (t1, step1, samples1) = self.clock[0], self.clock[-1]
            if t1 > t0 and step1 > step0:
                self.speed = (samples1 - samples0) / (t1 - t0)
                self.seconds_per_step = (t1 - t0) / (step1 - step0)
        # Between measurements (validation, an epoch's first steps) the last speed stands.
        speed = self.speed
        eta = None
        if self.seconds_per_step is not None:
            eta = (self.total_steps - state.step) * self.seconds_per_step
        recent = self.recent_losses
        self.callbacks.on_progress(
            Progress(
                phase=self.current_phase,
                # While saving, the epoch just completed; otherwise the one under way.
                epoch=max(state.epoch, 1)
                if self.current_phase == "saving"
                else min(state.epoch + 1, self.config.epochs),
                epochs=self.config.epochs,
                step=state.step,
                total_steps=self.total_steps,
                loss=sum(recent) / len(recent) if recent else None,
                samples_per_second=speed,
                eta_seconds=eta,
            )
        )
        self.flush_metrics()

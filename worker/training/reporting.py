"""What the loop tells its caller: progress, metric points, and the callbacks that get them.

Two threads call back. The training thread asks ``should_stop`` before each step and hands
over ``on_progress``; both must be cheap. Everything that writes somewhere slow, the metric
points and the checkpoints, goes to the loop's reporting thread (:class:`Background`), in
order, so a database round trip or an upload never holds up a step.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import torch

from worker.training.checkpoint import LoopState
from worker.training.config import TrainConfig

Phase = Literal["loading", "training", "validating", "saving"]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
# Metric points are sent in batches this far apart while training (at once in the other
# phases, and at each epoch end): each batch is a database write and an MLflow call whatever
# its size, and the reporting thread's Python competes with the training thread's for the GIL.
METRICS_INTERVAL_S = 5.0
RUNNING_LOSS_STEPS = 50
# The validation metrics each epoch reports (an embedding run names its own).
CLASSIFIER_EPOCH_METRICS = ("val_loss", "val_accuracy", "val_macro_f1")


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
    ``val_macro_f1`` (an embedding run: ``val_recall_at_1/5/10``, ``val_mrr_at_10``,
    ``val_ndcg_at_10``) and ``epoch`` per epoch."""

    name: str
    step: int
    value: float
    epoch: int


class Callbacks(Protocol):
    def on_progress(self, progress: Progress) -> None:
        """About once a second, and at every phase change; on the training thread: keep it
        cheap (note the progress, report it from elsewhere)."""

    def on_metrics(self, points: list[MetricPoint]) -> None:
        """New metric points, batched (every few seconds while training, and at each epoch
        end); on the reporting thread."""

    def should_stop(self) -> bool:
        """Asked before every step and validation batch, on the training thread: keep it
        cheap. True cancels."""

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        """A checkpoint was written to ``local_dir`` after ``step``; upload it now. On the
        reporting thread; the loop returns only after it did (a raise fails the run).

        The directory is replaced by the next checkpoint.
        """

    def on_reporting_thread_exit(self) -> None:
        """Last call on the reporting thread: release what the calls there opened (the
        runner closes that thread's database connection)."""


class ReportingError(RuntimeError):
    """A side effect run on the reporting thread failed; its exception is the cause."""


class Background:
    """The loop's reporting thread: runs jobs in the order given, off the training thread.

    The first job to raise is kept as a :class:`ReportingError`, which the training thread
    gets from its next :meth:`check`, :meth:`submit` or :meth:`drain`; the jobs after it are
    skipped. Jobs submitted with ``skip_when_stopping`` are skipped once :attr:`stopping` is
    set (a cancelled run does not wait for a checkpoint upload nobody will resume from). Use
    it as a context manager: leaving the block lets the thread finish what was submitted and
    stop, and a failure that left the block skips the pending skippable jobs.
    """

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit
        self.stopping = False
        self.failure: ReportingError | None = None
        self._jobs: queue.SimpleQueue[tuple[str, Callable[[], None], bool] | None] = (
            queue.SimpleQueue()
        )
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="training-reporting", daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.stopping = True
        self._jobs.put(None)
        self._thread.join()

    def submit(
        self, what: str, job: Callable[[], None], *, skip_when_stopping: bool = False
    ) -> None:
        """Run ``job`` on the reporting thread; ``what`` names it in a failure's message."""
        self.check()
        with self._idle:
            self._pending += 1
        self._jobs.put((what, job, skip_when_stopping))

    def check(self) -> None:
        """Raise the reporting thread's failure, if it had one."""
        if self.failure is not None:
            raise self.failure

    def drain(self) -> None:
        """Wait until every job submitted so far has run; then :meth:`check`."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self.check()

    def _work(self) -> None:
        try:
            while (item := self._jobs.get()) is not None:
                what, job, skippable = item
                try:
                    if self.failure is None and not (skippable and self.stopping):
                        job()
                except BaseException as exc:  # whatever it was, the run must hear of it
                    logger.exception("%s failed on the reporting thread", what)
                    failure = ReportingError(f"{what} failed: {type(exc).__name__}: {exc}")
                    failure.__cause__ = exc
                    self.failure = failure
                finally:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
        finally:
            self.on_exit()


class Reporter:
    """Turns loop events into throttled ``on_progress`` and batched ``on_metrics`` calls.

    Step losses stay on the device until a flush (once a second, every ``log_every_steps``,
    at epoch end and before a checkpoint), so the GPU is not synchronised on every step.
    ``on_metrics`` runs on ``background``.
    """

    def __init__(self, callbacks: Callbacks, config: TrainConfig, background: Background) -> None:
        self.callbacks, self.config, self.background = callbacks, config, background
        self.total_steps = 0
        self.current_phase: Phase = "loading"
        self.last_progress = -math.inf
        self.pending_losses: list[torch.Tensor] = []
        self.recent_losses: deque[float] = deque(maxlen=RUNNING_LOSS_STEPS)
        self.window_sum, self.window_steps = 0.0, 0  # since the last train_loss point
        self.points: list[MetricPoint] = []
        self.last_metrics = -math.inf
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

    def epoch_metrics(
        self,
        state: LoopState,
        epoch: int,
        metrics: dict[str, float],
        names: tuple[str, ...] = CLASSIFIER_EPOCH_METRICS,
    ) -> None:
        self.points += [
            MetricPoint(n, state.step, metrics[n], epoch) for n in names if n in metrics
        ]
        self.points.append(MetricPoint("epoch", state.step, float(epoch), epoch))
        self.flush_metrics()

    def flush_metrics(self) -> None:
        self.last_metrics = time.monotonic()
        if self.points:
            points, self.points = self.points, []
            on_metrics = self.callbacks.on_metrics
            self.background.submit(
                f"recording {len(points)} metric points", lambda: on_metrics(points)
            )

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
        if (
            self.current_phase != "training"
            or self.last_progress - self.last_metrics >= METRICS_INTERVAL_S
        ):
            self.flush_metrics()

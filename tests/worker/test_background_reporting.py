"""Checkpoints and metric points off the training thread: when they come, that the run waits
for them, and that a failure there fails the run by name."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.worker.conftest import Recorder, tiny_config
from worker.training import checkpoint
from worker.training.config import DataSpec
from worker.training.loop import MetricPoint, ReportingError, train
from worker.training.reporting import Background


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_schedule_needs_both_the_step_count_and_the_minimum_interval() -> None:
    clock = FakeClock()
    schedule = checkpoint.Schedule(every_steps=10, min_seconds=60.0, clock=clock)
    clock.now = 59.0
    assert not schedule.due(10)  # the step count says yes, the clock not yet
    clock.now = 61.0
    assert not schedule.due(11)  # the clock says yes, the step count not
    assert schedule.due(20)
    schedule.written()
    clock.now = 100.0
    assert not schedule.due(30)  # 39 s after the last one
    clock.now = 121.0
    assert schedule.due(30)
    step_only = checkpoint.Schedule(every_steps=10, min_seconds=0.0, clock=clock)
    assert [s for s in range(1, 41) if step_only.due(s)] == [10, 20, 30, 40]


def test_a_run_checkpoints_at_the_step_count_once_the_interval_has_passed(
    banking_slice: DataSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that ticks once per should_stop() call: one "second" per step (and per
    # validation batch), so the schedule is exact whatever the machine's speed.
    recorder = Recorder()
    monkeypatch.setattr(
        checkpoint,
        "Schedule",
        functools.partial(checkpoint.Schedule, clock=lambda: float(recorder.stop_checks)),
    )
    config = tiny_config(epochs=2, checkpoint_every_steps=5, checkpoint_min_seconds=12)
    result = train(
        config, banking_slice, validation_data=None, work_dir=tmp_path / "a", callbacks=recorder
    )
    # 24 steps an epoch, 6 validation batches. Step 15: 15 s since the start; 24: epoch end
    # (at 30 s, after validation); 40: 16 s after it; 48: epoch end. Steps 5, 10, 20, 25, 30,
    # 35 and 45 were multiples of 5 too early.
    assert [step for _, step in recorder.checkpoints] == [15, 24, 40, 48]

    # When the checkpoints fall changes nothing the run computes.
    without = train(
        tiny_config(epochs=2, checkpoint_every_steps=1000),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path / "b",
        callbacks=Recorder(),
    )
    assert result.metrics == without.metrics
    assert result.validation_predictions == without.validation_predictions


@dataclass
class SlowUploads(Recorder):
    """Takes its time over each checkpoint and notes the thread each callback ran on."""

    threads: dict[str, set[str]] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.threads.setdefault(what, set()).add(threading.current_thread().name)

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        self.note("on_checkpoint")
        # The directory is whole when handed over, and holds this step's loop state.
        state = checkpoint.read_state(local_dir)
        assert state["loop"]["step"] == step
        time.sleep(0.3)
        super().on_checkpoint(local_dir, step)

    def on_metrics(self, points: list[MetricPoint]) -> None:
        self.note("on_metrics")
        super().on_metrics(points)

    def should_stop(self) -> bool:
        self.note("should_stop")
        return super().should_stop()


def test_uploads_run_off_the_training_thread_and_the_run_waits_for_them(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    recorder = SlowUploads()
    result = train(
        tiny_config(epochs=2, checkpoint_every_steps=10),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path,
        callbacks=recorder,
    )
    assert result.stop_reason == "completed"
    training_thread = threading.current_thread().name
    assert recorder.threads["should_stop"] == {training_thread}
    assert recorder.threads["on_checkpoint"] == {"training-reporting"}
    assert recorder.threads["on_metrics"] == {"training-reporting"}
    # Every checkpoint, the last one included, was handed over before train() returned,
    # and so were the metric points; then the reporting thread ended.
    assert [step for _, step in recorder.checkpoints] == [10, 20, 24, 30, 40, 48]
    assert recorder.values("epoch") == [1.0, 2.0]
    assert recorder.reporting_thread_exits == 1
    assert not any(t.name == "training-reporting" for t in threading.enumerate())


@dataclass
class FailingUpload(Recorder):
    """An artifact store that has run out of space."""

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        super().on_checkpoint(local_dir, step)
        raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_upload_fails_the_run_naming_the_checkpoint(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    recorder = FailingUpload()
    with pytest.raises(ReportingError) as failed:
        train(
            tiny_config(epochs=3, checkpoint_every_steps=5),
            banking_slice,
            validation_data=None,
            work_dir=tmp_path,
            callbacks=recorder,
        )
    assert str(failed.value) == (
        "the checkpoint at step 5 failed: OSError: [Errno 28] No space left on device"
    )
    assert isinstance(failed.value.__cause__, OSError)
    # Nothing after the failure was handed over, and the run stopped within the epoch.
    assert [step for _, step in recorder.checkpoints] == [5]
    assert recorder.stop_checks <= 10  # at the latest, the next checkpoint waits for it
    assert recorder.reporting_thread_exits == 1


@dataclass
class FailingMetrics(Recorder):
    def on_metrics(self, points: list[MetricPoint]) -> None:
        raise ConnectionError("database unreachable")


def test_a_failed_metrics_write_fails_the_run(banking_slice: DataSpec, tmp_path: Path) -> None:
    with pytest.raises(ReportingError, match=r"metric points failed: ConnectionError: database"):
        train(
            tiny_config(epochs=1),
            banking_slice,
            validation_data=None,
            work_dir=tmp_path,
            callbacks=FailingMetrics(),
        )


def test_background_runs_jobs_in_order_and_keeps_the_first_failure() -> None:
    done: list[str] = []
    exits: list[str] = []
    release = threading.Event()

    def first() -> None:
        release.wait(5)
        done.append("first")

    def second() -> None:
        raise ValueError("boom")

    background = Background(lambda: exits.append(threading.current_thread().name))
    with pytest.raises(ReportingError, match="second failed: ValueError: boom"), background:
        background.submit("first", first)
        background.submit("second", second)
        background.submit("third", lambda: done.append("third"))  # skipped: after a failure
        release.set()
        background.drain()
    assert done == ["first"]
    assert exits == ["training-reporting"]
    with pytest.raises(ReportingError):  # and it stays failed
        background.submit("fourth", lambda: None)


def test_background_skips_skippable_jobs_once_stopping() -> None:
    done: list[str] = []
    gate = threading.Event()

    def hold() -> None:
        gate.wait(5)

    with Background(lambda: None) as background:
        background.submit("hold", hold)
        background.submit("upload", lambda: done.append("upload"), skip_when_stopping=True)
        background.submit("metrics", lambda: done.append("metrics"))
        background.stopping = True
        gate.set()
        background.drain()
    assert done == ["metrics"]

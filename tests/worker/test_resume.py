"""A run that dies after a checkpoint resumes from it and ends exactly where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.conftest import Recorder, SimulatedCrash, tiny_config
from worker.training.config import DataSpec
from worker.training.loop import ReportingError, train


def crashes(*, at_step: int) -> pytest.RaisesExc[ReportingError]:
    """The loop fails with the worker's crash as the cause, naming the checkpoint."""
    return pytest.raises(ReportingError, match=f"the checkpoint at step {at_step} failed")


def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    # 24 steps an epoch: checkpoints at 10, 20, 24 (epoch end), 30, ...
    config = tiny_config(epochs=3, checkpoint_every_steps=10)
    uninterrupted = train(
        config,
        banking_slice,
        validation_data=None,
        work_dir=tmp_path / "uninterrupted",
        callbacks=Recorder(),
    )

    crashing = Recorder(crash_at_checkpoint=2)
    with crashes(at_step=20) as crash:
        train(
            config,
            banking_slice,
            validation_data=None,
            work_dir=tmp_path / "crashed",
            callbacks=crashing,
        )
    assert isinstance(crash.value.__cause__, SimulatedCrash)
    checkpoint_dir, step = crashing.checkpoints[-1]
    assert step == 20 and (checkpoint_dir / "training_state.pt").is_file()

    # A fresh worker: its own work dir, the checkpoint as the artifact store handed it over.
    resumed_recorder = Recorder()
    resumed = train(
        config,
        banking_slice,
        validation_data=None,
        work_dir=tmp_path / "resumed",
        callbacks=resumed_recorder,
        resume_dir=checkpoint_dir,
    )
    assert resumed.resumed_from_step == 20
    assert uninterrupted.resumed_from_step is None
    assert resumed.steps == uninterrupted.steps == 3 * 24
    # The step counter never went back: every report after loading is past the checkpoint.
    assert all(p.step >= 20 for p in resumed_recorder.progress)
    assert [step for _, step in resumed_recorder.checkpoints] == [24, 30, 40, 48, 50, 60, 70, 72]
    # Same weights, optimizer moments, RNG and batch order: bit-identical on the CPU.
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.validation_predictions == uninterrupted.validation_predictions


def test_resume_from_an_epoch_end_checkpoint_in_the_same_work_dir(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    config = tiny_config(epochs=2, checkpoint_every_steps=1000)
    uninterrupted = train(
        config, banking_slice, validation_data=None, work_dir=tmp_path / "a", callbacks=Recorder()
    )
    crashing = Recorder(crash_at_checkpoint=1)
    with crashes(at_step=24):
        train(
            config, banking_slice, validation_data=None, work_dir=tmp_path / "b", callbacks=crashing
        )
    resumed = train(
        config,
        banking_slice,
        validation_data=None,
        work_dir=tmp_path / "b",
        callbacks=Recorder(),
        resume_dir=tmp_path / "b" / "checkpoint",
    )
    assert resumed.resumed_from_step == 24
    assert resumed.steps == 48
    assert resumed.metrics == uninterrupted.metrics


def test_resume_refuses_a_different_run(banking_slice: DataSpec, tmp_path: Path) -> None:
    crashing = Recorder(crash_at_checkpoint=1)
    with crashes(at_step=24):
        train(
            tiny_config(epochs=1),
            banking_slice,
            validation_data=None,
            work_dir=tmp_path,
            callbacks=crashing,
        )
    with pytest.raises(ValueError, match="batch_size"):
        train(
            tiny_config(epochs=1, batch_size=16),
            banking_slice,
            validation_data=None,
            work_dir=tmp_path / "again",
            callbacks=Recorder(),
            resume_dir=tmp_path / "checkpoint",
        )

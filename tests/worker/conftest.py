"""Fixtures for the Django-free worker code: a small banking77 slice and a recording callback.

No test here asks for a database: pytest-django leaves them alone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from worker.training.config import DataSpec, TrainConfig
from worker.training.loop import MetricPoint, Progress

BANKING77_TRAIN = (
    Path(__file__).resolve().parents[3] / "shared" / "datasets" / "banking77" / "train.csv"
)
# Eight labels about different things, so a tiny model separates them in a few epochs.
LABELS = [
    "age_limit",
    "apple_pay_or_google_pay",
    "change_pin",
    "country_support",
    "exchange_rate",
    "lost_or_stolen_phone",
    "terminate_account",
    "top_up_limits",
]


def write_slice(path: Path, labels: list[str], per_label: int) -> Path:
    """The first ``per_label`` banking77 rows of each label, as a text,category CSV."""
    counts = dict.fromkeys(labels, 0)
    rows = []
    with BANKING77_TRAIN.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle):
            if counts.get(row["category"], per_label) < per_label:
                counts[row["category"]] += 1
                rows.append({"text": row["text"], "category": row["category"]})
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def banking_slice(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    """8 labels x 30 rows; with validation_split=0.2: 192 rows to train on, 48 to validate."""
    path = write_slice(tmp_path_factory.mktemp("data") / "slice.csv", LABELS, 30)
    return DataSpec(path=path, text_column="text", label_column="category", format="csv")


def tiny_config(**overrides: Any) -> TrainConfig:
    """A tiny-bert config that learns the slice in a few seconds on two CPU cores."""
    values: dict[str, Any] = {
        "base_model": "tiny-bert",
        "epochs": 4,
        "learning_rate": 2e-3,
        "batch_size": 8,
        "validation_split": 0.2,
        "checkpoint_every_steps": 1000,
        # Checkpoints where the step count says, however fast the steps: tests count them.
        "checkpoint_min_seconds": 0,
        "seed": 7,
    }
    return TrainConfig(**{**values, **overrides})


@dataclass
class Recorder:
    """Callbacks that record everything; ``stop_after_steps`` cancels, ``crash_at_checkpoint``
    raises from the n-th ``on_checkpoint`` as a dying worker would (the loop then raises a
    ``ReportingError`` caused by it)."""

    stop_after_steps: int | None = None
    crash_at_checkpoint: int | None = None
    progress: list[Progress] = field(default_factory=list)
    metrics: list[MetricPoint] = field(default_factory=list)
    checkpoints: list[tuple[Path, int]] = field(default_factory=list)
    stop_checks: int = 0
    reporting_thread_exits: int = 0

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_metrics(self, points: list[MetricPoint]) -> None:
        self.metrics += points

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop_after_steps is not None and self.stop_checks > self.stop_after_steps

    def on_checkpoint(self, local_dir: Path, step: int) -> None:
        self.checkpoints.append((local_dir, step))
        if (
            self.crash_at_checkpoint is not None
            and len(self.checkpoints) == self.crash_at_checkpoint
        ):
            raise SimulatedCrash(f"worker died after the checkpoint at step {step}")

    def on_reporting_thread_exit(self) -> None:
        self.reporting_thread_exits += 1

    def values(self, name: str) -> list[float]:
        return [point.value for point in self.metrics if point.name == name]


class SimulatedCrash(Exception):
    pass

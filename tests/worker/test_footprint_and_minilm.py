"""Serving footprint of a trained model, and fine-tuning all-MiniLM-L6-v2 from its package."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.worker.conftest import LABELS, Recorder, tiny_config, write_slice
from worker.footprint import measure_memory_bytes
from worker.inference import load_classifier
from worker.training.config import DataSpec, TrainConfig
from worker.training.loop import train


def _parameter_bytes(model_dir: Path) -> int:
    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = weights.get_tensor(name)
            total += tensor.numel() * tensor.element_size()
    return total


def test_memory_footprint_is_at_least_the_weights(banking_slice: DataSpec, tmp_path: Path) -> None:
    result = train(
        tiny_config(epochs=1),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path,
        callbacks=Recorder(),
    )
    texts = [row["text"] for row in result.validation_predictions[:16]]
    measured = measure_memory_bytes(result.model_dir, texts)
    weights = _parameter_bytes(result.model_dir)
    assert weights <= measured < weights + 512 * 2**20


def test_minilm_fine_tunes_from_the_packaged_weights(tmp_path: Path) -> None:
    data = write_slice(tmp_path / "slice.csv", LABELS[:4], 8)
    config = TrainConfig(
        base_model="minilm-l6",
        epochs=1,
        learning_rate=5e-5,
        batch_size=8,
        max_length=32,
        validation_split=0.25,
        checkpoint_every_steps=1000,
    )
    started = time.monotonic()
    result = train(
        config,
        DataSpec(data, "text", "category", "csv"),
        validation_data=None,
        work_dir=tmp_path / "run",
        callbacks=Recorder(),
    )
    elapsed = time.monotonic() - started
    assert result.stop_reason == "completed" and result.steps == 3  # 24 rows / 8
    reloaded = load_classifier(result.model_dir)
    assert reloaded.model.config.hidden_size == 384 and reloaded.model.config.num_labels == 4
    assert reloaded.max_length == 32
    texts = [row["text"] for row in result.validation_predictions]
    assert [p["label"] for p in reloaded.predict(texts)] == [
        row["predicted"] for row in result.validation_predictions
    ]
    assert elapsed < 60, f"MiniLM fine-tuning took {elapsed:.0f} s"


@pytest.mark.parametrize("texts", [[]])
def test_footprint_needs_a_sample(texts: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        measure_memory_bytes(tmp_path, texts)

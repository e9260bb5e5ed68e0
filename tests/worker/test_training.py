"""The training loop on a tiny BERT: learning, reporting, determinism, cancel, early stop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.worker.conftest import Recorder, tiny_config, write_slice
from worker.inference import load_classifier
from worker.training.config import DataSpec
from worker.training.data import DataError
from worker.training.loop import TrainResult, train


@pytest.fixture(scope="module")
def trained(
    banking_slice: DataSpec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, Recorder]:
    recorder = Recorder()
    result = train(
        tiny_config(checkpoint_every_steps=20),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path_factory.mktemp("run"),
        callbacks=recorder,
    )
    return result, recorder


def test_tiny_bert_beats_chance_on_validation(trained: tuple[TrainResult, Recorder]) -> None:
    result, _ = trained
    assert result.stop_reason == "completed"
    assert result.device == "cpu"
    assert (result.train_rows, result.validation_rows) == (192, 48)
    assert set(result.metrics) == {"val_accuracy", "val_macro_f1", "val_loss", "train_loss"}
    # Chance is 1/8 = 0.125 on eight balanced labels.
    assert result.metrics["val_accuracy"] > 0.4
    assert result.metrics["val_macro_f1"] > 0.3
    assert result.best_epoch == 4
    assert result.steps == 4 * 24  # 192 rows in batches of 8


def test_model_dir_holds_safetensors_tokenizer_and_labels(
    trained: tuple[TrainResult, Recorder],
) -> None:
    result, _ = trained
    files = {path.name for path in result.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    labels = json.loads((result.model_dir / "labels.json").read_text())
    assert labels == {str(i): label for i, label in enumerate(result.labels)}
    assert result.labels == sorted(result.labels) and len(result.labels) == 8


def test_stored_predictions_match_a_reload_of_the_model(
    trained: tuple[TrainResult, Recorder],
) -> None:
    result, _ = trained
    assert len(result.validation_predictions) == result.validation_rows
    texts = [row["text"] for row in result.validation_predictions]
    reloaded = load_classifier(result.model_dir).predict(texts)
    assert [p["label"] for p in reloaded] == [
        row["predicted"] for row in result.validation_predictions
    ]
    assert [p["score"] for p in reloaded] == pytest.approx(
        [row["score"] for row in result.validation_predictions], abs=1e-6
    )
    correct = sum(row["label"] == row["predicted"] for row in result.validation_predictions)
    assert correct / len(texts) == pytest.approx(result.metrics["val_accuracy"])


def test_progress_metrics_and_checkpoints_are_reported(
    trained: tuple[TrainResult, Recorder],
) -> None:
    result, recorder = trained
    phases = [p.phase for p in recorder.progress]
    assert phases[0] == "loading" and phases[-1] == "saving"
    assert {"training", "validating"} <= set(phases)
    steps = [p.step for p in recorder.progress]
    assert steps == sorted(steps) and steps[-1] == result.steps
    assert all(p.total_steps == result.steps for p in recorder.progress[1:])
    assert all(p.epochs == 4 and 1 <= p.epoch <= 4 for p in recorder.progress)
    assert recorder.values("epoch") == [1.0, 2.0, 3.0, 4.0]
    for name in ("val_loss", "val_accuracy", "val_macro_f1"):
        assert len(recorder.values(name)) == 4
    train_loss_steps = [p.step for p in recorder.metrics if p.name == "train_loss"]
    assert train_loss_steps == list(range(10, result.steps + 1, 10))
    assert recorder.values("val_macro_f1")[-1] == result.metrics["val_macro_f1"]
    # Every 20 steps, except where that is an epoch's last step, and at every epoch end.
    assert [step for _, step in recorder.checkpoints] == [20, 24, 40, 48, 60, 72, 80, 96]


def test_same_seed_gives_identical_metrics(
    trained: tuple[TrainResult, Recorder], banking_slice: DataSpec, tmp_path: Path
) -> None:
    first, first_recorder = trained
    recorder = Recorder()
    again = train(
        tiny_config(checkpoint_every_steps=20),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path,
        callbacks=recorder,
    )
    assert again.metrics == first.metrics
    assert again.validation_predictions == first.validation_predictions
    assert [(p.name, p.step, p.value) for p in recorder.metrics] == [
        (p.name, p.step, p.value) for p in first_recorder.metrics
    ]


def test_cancel_returns_promptly(banking_slice: DataSpec, tmp_path: Path) -> None:
    recorder = Recorder(stop_after_steps=5)
    started = time.monotonic()
    result = train(
        tiny_config(epochs=50),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path,
        callbacks=recorder,
    )
    assert result.stop_reason == "cancelled"
    assert result.steps == 5
    assert "cancelled at step 5" in result.stop_detail
    assert result.validation_predictions == [] and result.best_epoch == 0
    assert not result.model_dir.exists()  # no epoch finished, so no best model yet
    assert time.monotonic() - started < 15


def test_early_stopping_when_the_metric_stops_improving(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    # At this learning rate the weights barely move: epoch 2 cannot beat epoch 1.
    result = train(
        tiny_config(epochs=6, learning_rate=1e-9, patience=1),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path,
        callbacks=Recorder(),
    )
    assert result.stop_reason == "early_stopping"
    assert result.best_epoch == 1
    assert result.steps == 2 * 24
    assert result.stop_detail.startswith("val_macro_f1 did not improve for 1 epochs (best ")
    assert "at epoch 1)" in result.stop_detail
    assert result.model_dir.is_dir() and len(result.validation_predictions) == 48


def test_validation_file_with_an_unseen_label_counts_it_as_wrong(
    banking_slice: DataSpec, tmp_path: Path
) -> None:
    validation = tmp_path / "validation.jsonl"
    rows = [
        {"utterance": "How old do I need to be to open an account?", "intent": "age_limit"},
        {"utterance": "I want to close my account for good", "intent": "terminate_account"},
        {"utterance": "My card was eaten by the machine", "intent": "card_swallowed"},
    ]
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train(
        tiny_config(epochs=1),
        banking_slice,
        validation_data=DataSpec(validation, "utterance", "intent", "jsonl"),
        work_dir=tmp_path / "run",
        callbacks=Recorder(),
    )
    assert result.stop_reason == "completed"
    assert "card_swallowed" not in result.labels
    assert result.train_rows == 240 and result.validation_rows == 3
    unseen = result.validation_predictions[2]
    assert unseen["label"] == "card_swallowed" and unseen["predicted"] in result.labels
    assert result.metrics["val_accuracy"] <= 2 / 3


def test_a_missing_column_is_a_data_error(tmp_path: Path) -> None:
    path = write_slice(tmp_path / "slice.csv", ["age_limit", "change_pin"], 5)
    with pytest.raises(DataError, match="no column 'label'"):
        train(
            tiny_config(),
            DataSpec(path, "text", "label", "csv"),
            validation_data=None,
            work_dir=tmp_path / "run",
            callbacks=Recorder(),
        )


def test_an_invalid_config_is_refused(banking_slice: DataSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        train(
            tiny_config(epochs=0),
            banking_slice,
            validation_data=None,
            work_dir=tmp_path,
            callbacks=Recorder(),
        )

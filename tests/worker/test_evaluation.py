"""Evaluating a trained tiny BERT on held-out banking77 rows: metrics checked against sklearn.

scikit-learn is only the reference here; worker hosts run the plain-Python metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as sk

from tests.worker.conftest import LABELS, Recorder, tiny_config
from worker.evaluation import (
    EvaluationResult,
    confusion_matrix,
    evaluate,
    expected_calibration_error,
    label_metrics,
    percentile,
    sample_rows,
)
from worker.inference import load_classifier
from worker.training.config import DataSpec
from worker.training.loop import train

BANKING77_TEST = (
    Path(__file__).resolve().parents[3] / "shared" / "datasets" / "banking77" / "test.csv"
)
# A real banking77 label the model below is never trained on.
UNSEEN_LABEL = "card_arrival"


def write_test_slice(path: Path, per_label: dict[str, int]) -> DataSpec:
    """The first ``per_label[label]`` rows of each label of banking77's test split."""
    counts = dict.fromkeys(per_label, 0)
    rows = []
    with BANKING77_TEST.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle):
            label = row["category"]
            if label in per_label and counts[label] < per_label[label]:
                counts[label] += 1
                rows.append({"text": row["text"], "category": label})
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return DataSpec(path=path, text_column="text", label_column="category", format="csv")


@pytest.fixture(scope="module")
def model_dir(banking_slice: DataSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT trained on the 8-label train slice (a few seconds on two CPU cores)."""
    result = train(
        tiny_config(),
        banking_slice,
        validation_data=None,
        work_dir=tmp_path_factory.mktemp("run"),
        callbacks=Recorder(),
    )
    return result.model_dir


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> DataSpec:
    """20 held-out test rows of each trained label, plus 5 of a label the model never saw."""
    per_label = {label: 20 for label in LABELS} | {UNSEEN_LABEL: 5}
    return write_test_slice(tmp_path_factory.mktemp("golden") / "golden.csv", per_label)


@pytest.fixture(scope="module")
def evaluated(model_dir: Path, golden: DataSpec) -> EvaluationResult:
    return evaluate(model_dir, golden, batch_size=16, max_predictions=500)


def test_metrics_equal_sklearn_on_the_same_predictions(evaluated: EvaluationResult) -> None:
    result = evaluated
    assert result.rows == 8 * 20 + 5 == len(result.predictions)
    truth = [p["label"] for p in result.predictions]
    predicted = [p["predicted"] for p in result.predictions]
    assert result.labels == sorted({*LABELS, UNSEEN_LABEL})

    assert result.accuracy == pytest.approx(sk.accuracy_score(truth, predicted), abs=1e-12)
    assert result.macro_f1 == pytest.approx(
        sk.f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12
    )
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        truth, predicted, labels=result.labels, zero_division=0
    )
    for i, label in enumerate(result.labels):
        assert result.per_label[label]["precision"] == pytest.approx(precision[i], abs=1e-12)
        assert result.per_label[label]["recall"] == pytest.approx(recall[i], abs=1e-12)
        assert result.per_label[label]["f1"] == pytest.approx(f1[i], abs=1e-12)
        assert result.per_label[label]["support"] == support[i]
    expected = sk.confusion_matrix(truth, predicted, labels=result.labels).tolist()
    assert result.confusion == expected
    # The model learned something, so this is not a comparison of two all-zero tables.
    assert result.accuracy > 0.4


def test_predictions_are_those_of_the_served_classifier(
    model_dir: Path, evaluated: EvaluationResult
) -> None:
    texts = [p["text"] for p in evaluated.predictions]
    served = load_classifier(model_dir).predict(texts)
    assert [p["predicted"] for p in evaluated.predictions] == [s["label"] for s in served]
    assert [p["score"] for p in evaluated.predictions] == pytest.approx(
        [s["score"] for s in served], abs=1e-5
    )


def test_confusion_rows_sum_to_support(evaluated: EvaluationResult) -> None:
    for label, row in zip(evaluated.labels, evaluated.confusion, strict=True):
        assert sum(row) == evaluated.per_label[label]["support"]
    assert sum(map(sum, evaluated.confusion)) == evaluated.rows
    assert [evaluated.per_label[label]["support"] for label in LABELS] == [20] * 8


def test_rows_of_a_label_the_model_never_saw_count_as_errors(
    evaluated: EvaluationResult,
) -> None:
    assert evaluated.unknown_labels == [UNSEEN_LABEL]
    unseen = evaluated.labels.index(UNSEEN_LABEL)
    assert evaluated.confusion[unseen][unseen] == 0
    assert sum(evaluated.confusion[unseen]) == 5
    assert evaluated.per_label[UNSEEN_LABEL] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 5,
    }
    correct = sum(evaluated.confusion[i][i] for i in range(len(evaluated.labels)))
    assert evaluated.accuracy == correct / evaluated.rows
    # The unseen label is in macro-F1's average (as a zero), as sklearn has it.
    f1s = [evaluated.per_label[label]["f1"] for label in evaluated.labels]
    assert evaluated.macro_f1 == pytest.approx(sum(f1s) / len(f1s))


def test_a_golden_set_of_a_few_labels_is_not_marked_down_for_the_others(
    model_dir: Path, tmp_path: Path
) -> None:
    few = write_test_slice(tmp_path / "few.csv", dict.fromkeys(LABELS[:3], 5))
    result = evaluate(model_dir, few)
    truth = [p["label"] for p in result.predictions]
    predicted = [p["predicted"] for p in result.predictions]
    # sklearn's default label set: those in the truth or the predictions, not every model label.
    assert result.macro_f1 == pytest.approx(
        sk.f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12
    )
    assert result.labels == sorted(LABELS) and result.unknown_labels == []
    never = [label for label in LABELS if label not in {*truth, *predicted}]
    for label in never:
        assert result.per_label[label]["support"] == 0
        assert result.confusion[result.labels.index(label)] == [0] * len(LABELS)


def test_latency_memory_and_device_are_measured(
    model_dir: Path, evaluated: EvaluationResult
) -> None:
    assert 0 < evaluated.latency_ms_p50 <= evaluated.latency_ms_p95
    model = load_classifier(model_dir, device="cpu").model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # CPU: the weights plus the resident growth while the batches ran (footprint's method).
    assert weights <= evaluated.peak_memory_bytes < weights + 512 * 2**20
    assert evaluated.device == "cpu"
    assert evaluated.batch_size == 16
    assert 0 <= evaluated.ece <= 1


def test_to_dict_is_json_and_leaves_out_predictions_unless_asked(
    evaluated: EvaluationResult,
) -> None:
    data = json.loads(json.dumps(evaluated.to_dict()))
    assert "predictions" not in data
    assert data["confusion"] == evaluated.confusion
    assert data["per_label"][LABELS[0]] == evaluated.per_label[LABELS[0]]
    with_predictions = json.loads(json.dumps(evaluated.to_dict(include_predictions=True)))
    assert len(with_predictions["predictions"]) == evaluated.rows


def test_predictions_are_capped_and_sampling_is_seeded(model_dir: Path, golden: DataSpec) -> None:
    first = evaluate(model_dir, golden, max_rows=40, seed=1, max_predictions=7, batch_size=64)
    again = evaluate(model_dir, golden, max_rows=40, seed=1, max_predictions=100)
    other = evaluate(model_dir, golden, max_rows=40, seed=2, max_predictions=100)
    assert first.rows == again.rows == other.rows == 40
    assert len(first.predictions) == 7
    assert first.predictions == again.predictions[:7]
    assert first.confusion == again.confusion and first.accuracy == again.accuracy
    assert [p["text"] for p in again.predictions] != [p["text"] for p in other.predictions]
    # One batch of 40: warm-up, then that batch is the only timing.
    assert first.latency_ms_p50 == first.latency_ms_p95 > 0


def test_sample_rows_is_deterministic_in_file_order(golden: DataSpec) -> None:
    rows = sample_rows(golden, 100, seed=0)
    assert rows == sample_rows(golden, 100, seed=0)
    assert rows != sample_rows(golden, 100, seed=1)
    assert len(set(rows)) == 100
    all_rows = sample_rows(golden, 10_000, seed=0)
    assert len(all_rows) == 165
    positions = [all_rows.index(row) for row in rows]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="max_rows"):
        sample_rows(golden, 0, seed=0)


def test_bad_arguments_are_refused(model_dir: Path, golden: DataSpec) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model_dir, golden, batch_size=0)
    with pytest.raises(ValueError, match="max_predictions"):
        evaluate(model_dir, golden, max_predictions=-1)


def test_ece_on_a_handcrafted_case() -> None:
    # Bin (0.2, 0.3]: 0.3 exactly, wrong. Bin (0.5, 0.6]: 0.55 right, 0.6 wrong.
    # Bin (0.9, 1]: 0.95 and 1.0 right, 0.9 belongs to (0.8, 0.9] and is wrong.
    confidences = [0.3, 0.55, 0.6, 0.95, 1.0, 0.9]
    correct = [False, True, False, True, True, False]
    expected = (
        1 / 6 * abs(0 - 0.3)
        + 2 / 6 * abs(0.5 - (0.55 + 0.6) / 2)
        + 2 / 6 * abs(1 - (0.95 + 1.0) / 2)
        + 1 / 6 * abs(0 - 0.9)
    )
    assert expected_calibration_error(confidences, correct) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error([], []) == 0.0
    # Perfectly calibrated: 80% confident, 80% right.
    assert expected_calibration_error([0.8] * 5, [True] * 4 + [False]) == pytest.approx(0.0)
    # Always sure, always wrong.
    assert expected_calibration_error([1.0] * 3, [False] * 3) == pytest.approx(1.0)


def test_ece_matches_an_independent_binned_computation() -> None:
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, 500)
    correct = rng.uniform(0, 1, 500) < confidences**2
    # Independent: numpy's digitize with right-inclusive edges, bins 1..10.
    bins = np.digitize(confidences, np.linspace(0, 1, 11), right=True)
    expected = sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - confidences[bins == b].mean())
        for b in range(1, 11)
        if (bins == b).any()
    )
    measured = expected_calibration_error(confidences.tolist(), correct.tolist())
    assert measured == pytest.approx(expected, abs=1e-12)


def test_metric_helpers_on_a_handcrafted_case() -> None:
    labels = ["a", "b", "c"]
    truth = ["a", "a", "b", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "a", "a"]
    confusion = confusion_matrix(truth, predicted, labels)
    assert confusion == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    per_label = label_metrics(confusion, labels)
    assert per_label["a"] == {"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2}
    assert per_label["b"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    assert per_label["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


@pytest.mark.parametrize("q", [0, 5, 50, 95, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentile([7.0], q) == 7.0

"""Evaluating a trained classifier on a labelled dataset: quality, calibration, speed, memory.

What a promotion gate reads. :func:`evaluate` loads a model directory once, predicts every
row (or a seeded random sample of them) in batches, and returns an
:class:`EvaluationResult`: accuracy, macro-F1, per-label precision/recall/F1, the confusion
matrix, expected calibration error, per-batch latency p50/p95 on the evaluating device and
peak memory. Plain Python metrics, no scikit-learn: worker hosts do not install it (the tests
check these numbers against it).

Definitions, fixed here so every evaluation of every model means the same thing:

- **labels**: the sorted union of the dataset's labels and the model's labels. The confusion
  matrix and ``per_label`` follow that order; confusion rows are the true label, columns the
  predicted one, so a row sums to that label's support.
- **unknown labels**: dataset labels the model was never trained on. The model cannot
  predict them, so their rows count as errors everywhere (accuracy, recall, ECE).
- **macro-F1**: the unweighted mean of per-label F1 over the labels that occur in the
  dataset or in the predictions (scikit-learn's ``f1_score(average="macro")``, and the
  training loop's ``val_macro_f1``). A model label that a golden set neither contains nor
  receives is left out, so a golden set covering a few labels is not marked down for the
  rest; it is still listed in ``per_label`` with support 0 and zeros.
- **precision/recall/F1** of a label with nothing to divide by (no predictions of it, no rows
  of it) are 0, as scikit-learn's ``zero_division=0``.
- **ECE**: the top-class probability is the confidence; rows go into 10 equal-width bins
  ``(0, 0.1], (0.1, 0.2], ..., (0.9, 1]``; ECE is the row-weighted mean over bins of
  ``|accuracy - mean confidence|`` (Guo et al., 2017).
- **latency**: wall time of one batch's forward pass (model and softmax, inputs already on
  the device; on CUDA synchronised before and after) for every batch, after one untimed
  warm-up pass over the first batch. p50/p95 interpolate linearly between order statistics
  (numpy's default ``percentile``). The last batch may be smaller than ``batch_size``.
- **peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` after a reset at the start of
  the evaluation, so it counts the weights and the largest batch's activations. CPU: the
  method of :func:`worker.footprint.measure_memory_bytes` over the whole run: the weights'
  bytes plus the peak growth of the resident set while the batches ran.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from worker.adapters import AdapterModel
from worker.footprint import _reset_peak_resident, _status_bytes
from worker.inference import Classifier, load_classifier
from worker.modeling import collate, encode
from worker.training.config import DataSpec
from worker.training.data import Example, read_examples

ECE_BINS = 10


class LabelMetrics(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int  # rows of this label in the dataset


class EvaluatedPrediction(TypedDict):
    text: str
    label: str  # the true label
    predicted: str
    score: float  # the predicted label's probability


@dataclass
class EvaluationResult:
    """One model evaluated on one dataset (see the module docstring for each definition)."""

    rows: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, LabelMetrics]
    labels: list[str]
    confusion: list[list[int]]  # [true][predicted], in ``labels`` order
    ece: float
    latency_ms_p50: float
    latency_ms_p95: float
    batch_size: int
    peak_memory_bytes: int
    device: str
    unknown_labels: list[str]
    # The first ``max_predictions`` rows, in evaluation order.
    predictions: list[EvaluatedPrediction]

    def to_dict(self, *, include_predictions: bool = False) -> dict[str, Any]:
        """Plain JSON types; ``predictions`` only when asked (they hold customer text)."""
        data = dataclasses.asdict(self)
        if not include_predictions:
            del data["predictions"]
        return data


def evaluate(
    model_dir: Path,
    data: DataSpec,
    *,
    batch_size: int = 32,
    max_predictions: int = 200,
    max_rows: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> EvaluationResult:
    """Evaluate the classifier saved in ``model_dir`` on the rows of ``data``.

    ``max_rows``: evaluate a random sample of that many rows instead of all of them
    (:func:`sample_rows`, deterministic for a given file and ``seed``): the "random sample of
    the tenant's held-out data" kind of dataset. ``seed`` is unused without ``max_rows``.
    ``device``: where to run (CUDA when available unless given). The model is loaded once.
    Raises ``ValueError`` for a bad argument, :class:`~worker.training.data.DataError` for
    unusable data.
    """
    _check_arguments(batch_size=batch_size, max_predictions=max_predictions)
    examples = read_examples(data) if max_rows is None else sample_rows(data, max_rows, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        # Tensors freed by an earlier evaluation in this process must not count as ours.
        gc.collect()
        torch.cuda.empty_cache()
    classifier = load_classifier(model_dir, device=device)
    return evaluate_classifier(
        classifier, examples, batch_size=batch_size, max_predictions=max_predictions
    )


def sample_rows(data: DataSpec, n: int, seed: int) -> list[Example]:
    """``n`` rows of ``data`` drawn uniformly without replacement, kept in file order.

    The same file and seed give the same rows on every host (``random.Random(seed)``); another
    seed gives another sample. All rows when the file has ``n`` or fewer.
    """
    if n < 1:
        raise ValueError("max_rows must be at least 1")
    examples = read_examples(data)
    if n >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[index] for index in chosen]


def evaluate_classifier(
    classifier: Classifier | AdapterModel,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_predictions: int = 200,
) -> EvaluationResult:
    """:func:`evaluate` for a classifier already loaded (several datasets, one load)."""
    _check_arguments(batch_size=batch_size, max_predictions=max_predictions)
    if not examples:
        raise ValueError("nothing to evaluate: no rows")
    texts = [example.text for example in examples]
    truth = [example.label for example in examples]
    predicted, scores, latencies_s, peak_bytes = _run(classifier, texts, batch_size)

    labels = sorted(set(truth) | set(classifier.labels))
    confusion = confusion_matrix(truth, predicted, labels)
    per_label = label_metrics(confusion, labels)
    occurring = set(truth) | set(predicted)
    f1s = [per_label[label]["f1"] for label in labels if label in occurring]
    correct = [t == p for t, p in zip(truth, predicted, strict=True)]
    return EvaluationResult(
        rows=len(examples),
        accuracy=sum(correct) / len(correct),
        macro_f1=sum(f1s) / len(f1s),
        per_label=per_label,
        labels=labels,
        confusion=confusion,
        ece=expected_calibration_error(scores, correct),
        latency_ms_p50=percentile(latencies_s, 50) * 1000,
        latency_ms_p95=percentile(latencies_s, 95) * 1000,
        batch_size=batch_size,
        peak_memory_bytes=peak_bytes,
        device=classifier.device,
        unknown_labels=sorted(set(truth) - set(classifier.labels)),
        predictions=[
            EvaluatedPrediction(text=e.text, label=e.label, predicted=p, score=s)
            for e, p, s in zip(
                examples[:max_predictions],
                predicted[:max_predictions],
                scores[:max_predictions],
                strict=True,
            )
        ],
    )


def _check_arguments(*, batch_size: int, max_predictions: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if max_predictions < 0:
        raise ValueError("max_predictions must not be negative")


def _run(
    classifier: Classifier | AdapterModel, texts: list[str], batch_size: int
) -> tuple[list[str], list[float], list[float], int]:
    """Predicted labels, their probabilities, seconds per batch, and peak memory in bytes.

    Tokenising and copying to the device happen outside the timed span: the latency is the
    model's, not the tokenizer's. Batches are tokenised up front so that the CPU resident-set
    reading sees the model's activations rather than the tokenizer's scratch space.
    """
    device = classifier.device
    cuda = device.startswith("cuda")
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    if isinstance(classifier, AdapterModel):
        # The shared base's own encoding and pass, as a replica runs the adapter.
        batches = [
            classifier.collate(texts[start : start + batch_size])
            for start in range(0, len(texts), batch_size)
        ]
        forward = classifier.probabilities
    else:
        batches = [
            {
                name: tensor.to(device)
                for name, tensor in collate(
                    encode(
                        classifier.tokenizer,
                        texts[start : start + batch_size],
                        classifier.max_length,
                    ),
                    classifier.pad_token_id,
                ).items()
            }
            for start in range(0, len(texts), batch_size)
        ]

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.softmax(classifier.model(**batch).logits.float(), dim=-1)

    predicted: list[str] = []
    scores: list[float] = []
    latencies: list[float] = []
    rss_before: int | None = None
    peak_was_reset = False
    with torch.inference_mode():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # Warm-up: first-call kernel selection and allocator growth are not a batch's latency.
        forward(batches[0])
        if cuda:
            torch.cuda.synchronize(device)
        else:
            gc.collect()
            rss_before = _status_bytes("VmRSS")
            peak_was_reset = _reset_peak_resident()
        for batch in batches:
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            probabilities = forward(batch)
            if cuda:
                torch.cuda.synchronize(device)
            latencies.append(time.perf_counter() - started)
            top, indices = probabilities.max(dim=-1)
            predicted += [classifier.labels[index] for index in indices.tolist()]
            scores += top.tolist()

    if cuda:
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        if isinstance(classifier, AdapterModel):
            # The adapter ran on the base: both were resident.
            peak = classifier.weight_bytes + classifier.base.weight_bytes
        else:
            tensors = [*classifier.model.parameters(), *classifier.model.buffers()]
            peak = sum(t.numel() * t.element_size() for t in tensors)
        rss_after = _status_bytes("VmHWM" if peak_was_reset else "VmRSS")
        if rss_before is not None and rss_after is not None:
            peak += max(0, rss_after - rss_before)
    return predicted, scores, latencies, peak


def confusion_matrix(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """Counts ``[i][j]`` of rows whose true label is ``labels[i]`` and prediction ``labels[j]``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    return matrix


def label_metrics(
    confusion: Sequence[Sequence[int]], labels: Sequence[str]
) -> dict[str, LabelMetrics]:
    """Precision, recall, F1 and support per label, from a confusion matrix (0 where 0/0)."""
    metrics: dict[str, LabelMetrics] = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        fp, fn = predicted - tp, support - tp
        metrics[label] = LabelMetrics(
            precision=tp / predicted if predicted else 0.0,
            recall=tp / support if support else 0.0,
            # 2PR/(P+R) written in counts: exact, and 0 rather than 0/0 when tp is 0.
            f1=2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            support=support,
        )
    return metrics


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> float:
    """ECE over ``bins`` equal-width confidence bins, upper edges inclusive; 0 for no rows.

    A confidence of exactly 0 goes into the first bin, anything above 1 (float rounding of
    a softmax) into the last.
    """
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    if not confidences:
        return 0.0
    # i / bins, not a running sum, so that 0.3 is exactly the third bin's upper edge.
    upper_edges = [(i + 1) / bins for i in range(bins)]
    counts = [0] * bins
    confidence_sums = [0.0] * bins
    correct_counts = [0] * bins
    for confidence, is_correct in zip(confidences, correct, strict=True):
        b = min(bisect.bisect_left(upper_edges, confidence), bins - 1)
        counts[b] += 1
        confidence_sums[b] += confidence
        correct_counts[b] += int(is_correct)
    total = len(confidences)
    return sum(
        counts[b] / total * abs(correct_counts[b] / counts[b] - confidence_sums[b] / counts[b])
        for b in range(bins)
        if counts[b]
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

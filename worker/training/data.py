"""Reading labelled texts and holding out a validation split."""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass

from worker.training.config import DataSpec


class DataError(ValueError):
    """The data file cannot be used as given (missing column, empty, unreadable row)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def read_examples(spec: DataSpec) -> list[Example]:
    """Every row of ``spec`` as an :class:`Example`, in file order.

    Labels are compared as strings (a JSONL label of ``3`` is ``"3"``). A row without a text
    or a label is an error naming its line, not a silent skip.
    """
    if spec.format == "csv":
        rows = _read_csv(spec)
    elif spec.format == "jsonl":
        rows = _read_jsonl(spec)
    else:
        raise DataError(f"unsupported data format {spec.format!r}")
    examples = []
    for line, row in rows:
        text, label = row.get(spec.text_column), row.get(spec.label_column)
        if text is None or label is None or str(text).strip() == "" or str(label) == "":
            raise DataError(f"{spec.path.name} line {line}: empty text or label")
        examples.append(Example(text=str(text), label=str(label)))
    if not examples:
        raise DataError(f"{spec.path.name} has no rows")
    return examples


def _read_csv(spec: DataSpec) -> list[tuple[int, dict[str, object]]]:
    with spec.path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        _check_columns(spec, columns)
        # Data rows start on line 2, after the header.
        return [(number, dict(row)) for number, row in enumerate(reader, start=2)]


def _read_jsonl(spec: DataSpec) -> list[tuple[int, dict[str, object]]]:
    rows: list[tuple[int, dict[str, object]]] = []
    with spec.path.open(encoding="utf-8-sig") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{spec.path.name} line {number}: invalid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{spec.path.name} line {number}: not a JSON object")
            if not rows:
                _check_columns(spec, list(row))
            rows.append((number, row))
    return rows


def _check_columns(spec: DataSpec, columns: list[str]) -> None:
    missing = [c for c in (spec.text_column, spec.label_column) if c not in columns]
    if missing:
        raise DataError(f"{spec.path.name} has no column {', '.join(map(repr, missing))}")


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each label's rows (at least one where a label has two or more).

    Stratified, so every label with two rows or more is both trained on and validated; the
    result depends only on the rows and the seed.
    """
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_label[example.label].append(index)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        if len(indices) < 2:
            continue
        rng.shuffle(indices)
        count = min(len(indices) - 1, max(1, round(len(indices) * fraction)))
        held_out.update(indices[:count])
    if not held_out:
        raise DataError("too few rows to hold out a validation split")
    train = [e for i, e in enumerate(examples) if i not in held_out]
    validation = [e for i, e in enumerate(examples) if i in held_out]
    return train, validation

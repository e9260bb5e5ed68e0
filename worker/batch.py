"""Batch scoring without Django: a dataset file's texts through a loaded serving model, by
the same pre- and post-processing a replica applies (``worker.serving.loading``), written
one chunk at a time as output parts, and the parts joined into the output file.

A part is the rows of one chunk, in file order, each ``{"row", "text", "label", "score",
"top_k": [{"label", "score"}, ...]}`` (the first of ``top_k`` is the predict endpoint's
answer); a CSV output has the columns ``row, text, label, score, top_k`` (``top_k`` as
JSON).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from worker import adapters
from worker.serving.loading import FORWARD_BATCH, FastClassifier

CSV_FIELDS = ("row", "text", "label", "score", "top_k")


class ColumnError(ValueError):
    """The file has no column of that name (the message names those it has)."""


def columns_of(head: bytes, fmt: str) -> list[str]:
    """The column names in the first line of a CSV or JSON-lines file."""
    first = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").strip("\r")
    if fmt == "jsonl":
        try:
            row = json.loads(first)
        except ValueError:
            return []
        return list(row) if isinstance(row, dict) else []
    return next(csv.reader([first]), [])


def read_texts(path: Path, fmt: str, column: str) -> list[str]:
    """The ``column`` of every row of the file, in file order (missing values as "")."""
    texts: list[str] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if fmt == "jsonl":
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        raise ColumnError(f"row {len(texts) + 1} has no '{column}'")
                    texts.append(str(row[column] or ""))
            return texts
        reader = csv.DictReader(fh)
        if column not in (reader.fieldnames or []):
            raise ColumnError(
                f"no column '{column}'; the file has {', '.join(reader.fieldnames or [])}"
            )
        return [str(row.get(column) or "") for row in reader]


@torch.inference_mode()
def score(served: Any, texts: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` most likely labels of each text with their probabilities, best first."""
    labels = served.labels
    k = max(1, min(k, len(labels)))
    results: list[list[dict[str, Any]]] = []
    step = adapters.FORWARD_ROWS if isinstance(served, adapters.AdapterModel) else FORWARD_BATCH
    for start in range(0, len(texts), step):
        chunk = list(texts[start : start + step])
        probabilities = _probabilities(served, chunk)
        values, indices = probabilities.topk(k, dim=-1)
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            results.append(
                [
                    {"label": labels[i], "score": v}
                    for v, i in zip(row_values, row_indices, strict=True)
                ]
            )
    return results


def _probabilities(served: Any, texts: list[str]) -> torch.Tensor:
    if isinstance(served, adapters.AdapterModel):
        return served.probabilities(served.collate(texts)).float()
    if isinstance(served, FastClassifier):
        return served.probabilities(texts)
    raise TypeError(f"batch predictions score classifiers; got {type(served).__name__}")


def part_rows(first_row: int, texts: Sequence[str], scored: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"row": first_row + i, "text": text, "label": best[0]["label"], "score": best[0]["score"],
         "top_k": best}
        for i, (text, best) in enumerate(zip(texts, scored, strict=True))
    ]  # fmt: skip


def encode_part(rows: Iterable[dict[str, Any]], fmt: str) -> bytes:
    """A part's bytes: JSON lines, or CSV rows without a header (the join writes it)."""
    if fmt == "jsonl":
        return b"".join(
            (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            for row in rows
        )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        top = json.dumps(row["top_k"], ensure_ascii=False, separators=(",", ":"))
        writer.writerow([row["row"], row["text"], row["label"], row["score"], top])
    return out.getvalue().encode()


def join_parts(parts: Iterable[Iterator[bytes]], target: Path, fmt: str) -> tuple[str, int]:
    """Concatenate the parts (each an iterator of byte chunks, in order) into ``target``,
    with the CSV header first; the output's sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        if fmt == "csv":
            header = (",".join(CSV_FIELDS) + "\n").encode()
            out.write(header)
            digest.update(header)
            size += len(header)
        for part in parts:
            for block in part:
                out.write(block)
                digest.update(block)
                size += len(block)
    return digest.hexdigest(), size

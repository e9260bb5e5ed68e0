"""Batch scoring without Django: a dataset file's rows through a loaded serving model, by
the same pre- and post-processing a replica applies (``worker.serving``), written one
chunk at a time as output parts, and the parts joined into the output file.

What a row becomes depends on the model's kind (:func:`scorer_for`):

* **classifier** — ``{"row", "text", "label", "score", "top_k": [{"label", "score"}]}``
  (the first of ``top_k`` is the predict endpoint's answer); JSON lines, or CSV with the
  columns ``row, text, label, score, top_k`` (``top_k`` as JSON).
* **embedding** — the text's L2-normalised vector by the ``role``'s encoder (the embed
  endpoint's); ``.npy`` (float32, rows x dim, row i the file's row i), Parquet (columns
  ``row``, ``text``, ``vector``) or JSON lines ``{"row", "text", "vector"}``. A part is the
  chunk's float32 bytes, whatever the format: the join writes the format.
* **autocomplete** — ``{"row", "prefix", "context", "completion", "score", "tokens",
  "completions": [{"text", "score", "tokens"}]}`` for the text as the reply's prefix (and
  the context column's customer message), greedy as the complete endpoint's default;
  JSON lines, or CSV with ``row, prefix, context, completion, score, tokens,
  completions, error``. A row the complete endpoint would refuse (an empty or too long prefix)
  gets no completion and its ``error``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker import adapters
from worker import autocomplete_text as limits
from worker.serving.autocomplete import AutocompleteModel, CompletionRequest
from worker.serving.embedding import EmbeddingModel, check_role
from worker.serving.loading import FORWARD_BATCH, FastClassifier

CSV_FIELDS = ("row", "text", "label", "score", "top_k")
COMPLETION_CSV_FIELDS = (
    "row", "prefix", "context", "completion", "score", "tokens", "completions", "error"
)  # fmt: skip
# The formats each model kind writes, its default first.
FORMATS = {
    "classifier": ("jsonl", "csv"),
    "embedding": ("npy", "parquet", "jsonl"),
    "autocomplete": ("jsonl", "csv"),
}
# Prompts an autocomplete scorer decodes together (one padded forward per step).
COMPLETE_BATCH = 32
# Dimensions of a vector the preview keeps.
PREVIEW_DIMS = 8


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


def read_columns(path: Path, fmt: str, columns: Sequence[str]) -> list[list[str]]:
    """Each of ``columns`` of every row of the file, in file order (missing values as
    ""): one list per column."""
    out: list[list[str]] = [[] for _ in columns]
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if fmt == "jsonl":
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                for values, column in zip(out, columns, strict=True):
                    if column not in row:
                        raise ColumnError(f"row {len(values) + 1} has no '{column}'")
                    values.append(str(row[column] or ""))
            return out
        reader = csv.DictReader(fh)
        for column in columns:
            if column not in (reader.fieldnames or []):
                raise ColumnError(
                    f"no column '{column}'; the file has {', '.join(reader.fieldnames or [])}"
                )
        for row in reader:
            for values, column in zip(out, columns, strict=True):
                values.append(str(row.get(column) or ""))
    return out


def read_texts(path: Path, fmt: str, column: str) -> list[str]:
    """The ``column`` of every row of the file, in file order (missing values as "")."""
    return read_columns(path, fmt, [column])[0]


# --- classifiers -----------------------------------------------------------------------


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
    raise TypeError(f"not a classifier: {type(served).__name__}")


def part_rows(first_row: int, texts: Sequence[str], scored: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"row": first_row + i, "text": text, "label": best[0]["label"], "score": best[0]["score"],
         "top_k": best}
        for i, (text, best) in enumerate(zip(texts, scored, strict=True))
    ]  # fmt: skip


def _json_line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def encode_part(rows: Iterable[dict[str, Any]], fmt: str) -> bytes:
    """A classifier part's bytes: JSON lines, or CSV rows without a header (the join
    writes it)."""
    if fmt == "jsonl":
        return b"".join(_json_line(row) for row in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow(
            [row["row"], row["text"], row["label"], row["score"], _compact(row["top_k"])]
        )
    return out.getvalue().encode()


def join_parts(
    parts: Iterable[Iterator[bytes]], target: Path, fmt: str, header: bytes = b""
) -> tuple[str, int]:
    """Concatenate the parts (each an iterator of byte chunks, in order) into ``target``
    after ``header`` (a CSV's column names when empty and ``fmt`` is csv); the output's
    sha256 and size."""
    if not header and fmt == "csv":
        header = (",".join(CSV_FIELDS) + "\n").encode()
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        for block in _blocks(header, parts):
            out.write(block)
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _blocks(header: bytes, parts: Iterable[Iterator[bytes]]) -> Iterator[bytes]:
    if header:
        yield header
    for part in parts:
        yield from part


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


# --- one scorer per model kind ----------------------------------------------------------


@dataclass
class Part:
    """A scored chunk: its stored bytes, the rows a preview shows, the labels it counts."""

    data: bytes
    preview: list[dict[str, Any]]
    labels: list[str]


@dataclass
class Options:
    """What a job asks of its model beyond the rows (the kinds' own fields)."""

    fmt: str
    top_k: int = 3
    role: str = "query"
    max_tokens: int = limits.MAX_TOKENS_DEFAULT
    n: int = 1


class ClassifierScorer:
    kind = "classifier"

    def __init__(self, served: Any, options: Options) -> None:
        self.served, self.options = served, options

    def part(self, first: int, texts: Sequence[str], contexts: Sequence[str]) -> Part:
        rows = part_rows(first, texts, score(self.served, texts, self.options.top_k))
        return Part(encode_part(rows, self.options.fmt), rows, [str(row["label"]) for row in rows])

    def join(
        self, parts: Iterable[Iterator[bytes]], texts: Sequence[str], contexts: Sequence[str],
        target: Path,
    ) -> tuple[str, int]:  # fmt: skip
        return join_parts(parts, target, self.options.fmt)


class EmbeddingScorer:
    kind = "embedding"

    def __init__(self, served: EmbeddingModel, options: Options) -> None:
        self.served, self.options = served, options
        self.role = check_role(options.role)

    @property
    def dim(self) -> int:
        return self.served.dim

    def part(self, first: int, texts: Sequence[str], contexts: Sequence[str]) -> Part:
        vectors = np.ascontiguousarray(self.served.embed(list(texts), self.role), dtype="<f4")
        preview = [
            {"row": first + i, "text": text,
             "vector": [round(float(x), 4) for x in vector[:PREVIEW_DIMS]]}
            for i, (text, vector) in enumerate(zip(texts, vectors, strict=True))
        ]  # fmt: skip
        return Part(vectors.tobytes(), preview, [])

    def join(
        self, parts: Iterable[Iterator[bytes]], texts: Sequence[str], contexts: Sequence[str],
        target: Path,
    ) -> tuple[str, int]:  # fmt: skip
        fmt, dim = self.options.fmt, self.dim
        if fmt == "npy":
            return join_parts(parts, target, fmt, header=npy_header(len(texts), dim))
        if fmt == "jsonl":
            return join_parts(self._jsonl(parts, texts), target, fmt)
        self._parquet(parts, texts, target)
        return _file_digest(target)

    def _vectors(self, parts: Iterable[Iterator[bytes]]) -> Iterator[np.ndarray]:
        for part in parts:
            data = b"".join(part)
            yield np.frombuffer(data, dtype="<f4").reshape(-1, self.dim)

    def _jsonl(
        self, parts: Iterable[Iterator[bytes]], texts: Sequence[str]
    ) -> Iterator[Iterator[bytes]]:
        row = 0
        for vectors in self._vectors(parts):
            lines = []
            for vector in vectors:
                lines.append(
                    _json_line({"row": row, "text": texts[row], "vector": vector.tolist()})
                )
                row += 1
            yield iter(lines)

    def _parquet(
        self, parts: Iterable[Iterator[bytes]], texts: Sequence[str], target: Path
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("row", pa.int64()), ("text", pa.string()),
             ("vector", pa.list_(pa.float32(), self.dim))]
        )  # fmt: skip
        row = 0
        # One row group per part; no creation time in the file, so a resumed job's output
        # is the same bytes as an uninterrupted one's.
        with pq.ParquetWriter(str(target), schema, compression="zstd") as writer:
            for vectors in self._vectors(parts):
                count = len(vectors)
                flat = pa.array(vectors.reshape(-1), type=pa.float32())
                table = pa.Table.from_arrays(
                    [
                        pa.array(range(row, row + count), type=pa.int64()),
                        pa.array(texts[row : row + count], type=pa.string()),
                        pa.FixedSizeListArray.from_arrays(flat, self.dim),
                    ],
                    schema=schema,
                )
                writer.write_table(table)
                row += count


def npy_header(rows: int, dim: int) -> bytes:
    """The header of an ``.npy`` file of float32 ``rows x dim`` (format 1.0), as
    ``numpy.save`` writes it."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    )
    return out.getvalue()


class CompletionScorer:
    kind = "autocomplete"

    def __init__(self, served: AutocompleteModel, options: Options) -> None:
        self.served, self.options = served, options

    def _request(self, prefix: str, context: str) -> CompletionRequest | str:
        """The complete endpoint's request for a row, or why it would refuse it."""
        if not prefix.strip():
            return "prefix is empty"
        if len(prefix) > limits.PREFIX_MAX_CHARS:
            return f"prefix is longer than {limits.PREFIX_MAX_CHARS} characters"
        if len(context) > limits.CONTEXT_MAX_CHARS:
            return f"context is longer than {limits.CONTEXT_MAX_CHARS} characters"
        return CompletionRequest(
            prefix=prefix, context=context, max_tokens=self.options.max_tokens, n=self.options.n
        )

    def part(self, first: int, texts: Sequence[str], contexts: Sequence[str]) -> Part:
        requests = [self._request(p, c) for p, c in zip(texts, contexts, strict=True)]
        good = [r for r in requests if isinstance(r, CompletionRequest)]
        answers: list[dict[str, Any]] = []
        for start in range(0, len(good), COMPLETE_BATCH):
            answers += self.served.complete_many(good[start : start + COMPLETE_BATCH])
        found = iter(answers)
        rows = []
        for i, (prefix, context, request) in enumerate(zip(texts, contexts, requests, strict=True)):
            row: dict[str, Any] = {"row": first + i, "prefix": prefix, "context": context}
            if isinstance(request, str):
                row.update(completion="", score=None, tokens=0, completions=[], error=request)
            else:
                completions = next(found)["completions"]
                best = completions[0] if completions else {"text": "", "score": None, "tokens": 0}
                row.update(completion=best["text"], score=best["score"], tokens=best["tokens"],
                           completions=completions)  # fmt: skip
            rows.append(row)
        return Part(self._encode(rows), rows, [])

    def _encode(self, rows: list[dict[str, Any]]) -> bytes:
        if self.options.fmt == "jsonl":
            return b"".join(_json_line(row) for row in rows)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in rows:
            writer.writerow(
                [row["row"], row["prefix"], row["context"], row["completion"],
                 "" if row["score"] is None else row["score"], row["tokens"],
                 _compact(row["completions"]), row.get("error", "")]
            )  # fmt: skip
        return out.getvalue().encode()

    def join(
        self, parts: Iterable[Iterator[bytes]], texts: Sequence[str], contexts: Sequence[str],
        target: Path,
    ) -> tuple[str, int]:  # fmt: skip
        header = (
            (",".join(COMPLETION_CSV_FIELDS) + "\n").encode() if self.options.fmt == "csv" else b""
        )
        return join_parts(parts, target, self.options.fmt, header=header)


Scorer = ClassifierScorer | EmbeddingScorer | CompletionScorer


def scorer_for(served: Any, options: Options) -> Scorer:
    """The scorer of a loaded serving model (``worker.serving.loading.load_model``)."""
    if isinstance(served, EmbeddingModel):
        return EmbeddingScorer(served, options)
    if isinstance(served, AutocompleteModel):
        return CompletionScorer(served, options)
    if isinstance(served, FastClassifier | adapters.AdapterModel):
        return ClassifierScorer(served, options)
    raise TypeError(f"batch predictions cannot score a {type(served).__name__}")

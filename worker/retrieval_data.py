"""Reading retrieval data: a knowledge base of documents and the (query, document) pairs
that say which document answers which query; holding out a validation split of queries.

A pairs file is read like a classifier's table (:class:`~worker.training.config.DataSpec`):
``text_column`` names the query column, ``label_column`` the document-id column. A
documents file has columns ``id``, ``text`` and optionally ``title`` (CSV or JSONL).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from worker.training.config import DataSpec
from worker.training.data import DataError, read_examples


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Pair:
    query: str
    document_id: str


def read_documents(path: Path, format: str) -> list[Document]:
    """Every document of the knowledge base, in file order; ids must be unique, text set."""
    if format == "csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows: list[tuple[int, dict[str, object]]] = [
                (number, dict(row)) for number, row in enumerate(reader, start=2)
            ]
    elif format == "jsonl":
        rows, columns = [], []
        with path.open(encoding="utf-8-sig") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path.name} line {number}: invalid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path.name} line {number}: not a JSON object")
                if not rows:
                    columns = list(row)
                rows.append((number, row))
    else:
        raise DataError(f"unsupported documents format {format!r}")
    if rows and (missing := [c for c in ("id", "text") if c not in columns]):
        raise DataError(f"{path.name} has no column {', '.join(map(repr, missing))}")
    documents: list[Document] = []
    seen: set[str] = set()
    for line, row in rows:
        raw_id, text, title = row.get("id"), row.get("text"), row.get("title")
        if raw_id is None or str(raw_id).strip() == "" or text is None or str(text).strip() == "":
            raise DataError(f"{path.name} line {line}: empty id or text")
        document_id = str(raw_id)
        if document_id in seen:
            raise DataError(f"{path.name} line {line}: duplicate document id {document_id!r}")
        seen.add(document_id)
        documents.append(
            Document(id=document_id, text=str(text), title="" if title is None else str(title))
        )
    if not documents:
        raise DataError(f"{path.name} has no documents")
    return documents


def read_pairs(spec: DataSpec) -> list[Pair]:
    """Every (query, document id) row of ``spec``, in file order."""
    return [Pair(query=e.text, document_id=e.label) for e in read_examples(spec)]


def check_pairs(pairs: list[Pair], documents: list[Document], *, name: str = "pairs") -> None:
    """A :class:`DataError` naming the first pair whose document is not in ``documents``."""
    known = {d.id for d in documents}
    for index, pair in enumerate(pairs):
        if pair.document_id not in known:
            raise DataError(
                f"{name} row {index + 1}: document {pair.document_id!r} is not in the documents"
            )


def split_queries(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the distinct queries (every pair of a held-out query goes
    with it, so no validation query was trained on). Depends only on the pairs and seed."""
    queries = sorted({p.query for p in pairs})
    if len(queries) < 2:
        raise DataError("too few distinct queries to hold out a validation split")
    rng = random.Random(seed)
    rng.shuffle(queries)
    count = min(len(queries) - 1, max(1, round(len(queries) * fraction)))
    held_out = set(queries[:count])
    train = [p for p in pairs if p.query not in held_out]
    validation = [p for p in pairs if p.query in held_out]
    return train, validation


def relevant_sets(pairs: list[Pair]) -> tuple[list[str], list[set[str]]]:
    """The distinct queries in first-seen order, and each one's relevant document ids."""
    by_query: dict[str, set[str]] = {}
    for pair in pairs:
        by_query.setdefault(pair.query, set()).add(pair.document_id)
    return list(by_query), list(by_query.values())

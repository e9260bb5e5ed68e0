"""Check and profile a retrieval version: its knowledge base, and its pairs against it.

The pairs file goes through ``ingest.profile_file`` like classifier data (the query is its
text, the document id its label). The knowledge base is read row by row with exact line
numbers (its ids must be held anyway, to check the pairs against them), after the same
byte scan as every upload: encoding, NUL bytes, over-long lines.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apps.core.errors import InvalidInput
from apps.datasets import ingest

PAIR_ROLES: ingest.Roles = ("query", "document id")
ID, TEXT, TITLE = "id", "text", "title"
FIELD = "documents"  # the multipart field, and the form field errors are reported on


@dataclass
class DocumentsProfile:
    format: str
    count: int = 0
    ids: set[str] = field(default_factory=set)
    preview: list[dict[str, str]] = field(default_factory=list)


def _bad(message: str, *, code: str, line: int | None = None) -> InvalidInput:
    text = (
        f"the documents file, line {line}: {message}" if line else f"the documents file: {message}"
    )
    return InvalidInput(text, code=code, fields={FIELD: [text]}, line=line)


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, row) for each non-blank row; CSV values are strings, JSON ones as written."""
    if fmt == "jsonl":
        with io.open(path, encoding="utf-8-sig", newline="\n") as fh:  # noqa: UP020
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _bad(f"not valid JSON ({exc.msg})", code="json", line=line_no) from None
                if not isinstance(obj, dict):
                    raise _bad("expected a JSON object per line", code="json", line=line_no)
                yield line_no, obj
        return
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise _bad("the file is empty", code="empty") from None
        except csv.Error as exc:
            raise _bad(f"the header is not valid CSV ({exc})", code="csv", line=1) from None
        found = ", ".join(repr(c) for c in header) or "none"
        for name in (ID, TEXT):
            if name not in header:
                raise _bad(
                    f"missing the column {name!r}; the columns found are {found} "
                    f"(a knowledge base has the columns {ID!r}, {TEXT!r} and optionally {TITLE!r})",
                    code="missing_column",
                    line=1,
                )
        while True:
            line_no = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _bad(f"not valid CSV ({exc})", code="csv", line=line_no) from None
            if not row:
                continue
            if len(row) != len(header):
                raise _bad(
                    f"expected {len(header)} fields like the header, found {len(row)}",
                    code="csv",
                    line=line_no,
                )
            yield line_no, dict(zip(header, row, strict=True))


def profile_documents(
    path: Path,
    *,
    filename: str,
    fmt: str | None,
    max_line_bytes: int,
    first_nul: int | None = None,
) -> DocumentsProfile:
    """Check a knowledge base completely: every row an id and a text (a title optional),
    no id twice; raise ``InvalidInput`` on the ``documents`` field naming the first problem."""
    if path.stat().st_size == 0:
        raise _bad("the file is empty", code="empty")
    try:
        ingest.scan_bytes(path, max_line_bytes=max_line_bytes, first_nul=first_nul)
    except InvalidInput as exc:  # the same checks, reported on this file
        raise _bad(exc.message.split(": ", 1)[-1], code=exc.code, line=exc.line) from None
    profile = DocumentsProfile(format=ingest.detect_format(path, filename, fmt))
    first_line: dict[str, int] = {}
    for line_no, row in _rows(path, profile.format):
        values: dict[str, str] = {}
        for name in (ID, TEXT, TITLE):
            value = row.get(name)
            if value is None:
                if name == TITLE:
                    values[name] = ""
                    continue
                raise _bad(
                    f"missing the field {name!r}; this line has "
                    f"{', '.join(repr(k) for k in row) or 'no fields'}",
                    code="missing_column",
                    line=line_no,
                )
            if name == ID and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # JSON ids may be integers, as labels may
            if not isinstance(value, str):
                raise _bad(f"the {name} must be a string", code="json", line=line_no)
            values[name] = value
        # Ids are compared exactly as written, as training and evaluation read them.
        doc_id = values[ID]
        if not doc_id.strip():
            raise _bad("the id is empty", code="empty_label", line=line_no)
        if not values[TEXT].strip():
            raise _bad(f"the text of document {doc_id!r} is empty", code="empty_text", line=line_no)
        if doc_id in first_line:
            raise _bad(
                f"the document id {doc_id!r} appears twice (first on line {first_line[doc_id]})",
                code="duplicate_id",
                line=line_no,
            )
        first_line[doc_id] = line_no
        if len(profile.preview) < ingest.PREVIEW_ROWS:
            profile.preview.append({"id": doc_id, "title": values[TITLE], "text": values[TEXT]})
        profile.count += 1
    if profile.count == 0:
        raise _bad("the file has no documents", code="empty")
    profile.ids = set(first_line)
    return profile


def _first_missing(
    path: Path, fmt: str, *, document_column: str, known: set[str]
) -> tuple[str, int]:
    """The first pair (its document id, its line) whose id is not in ``known``; the pairs
    file was already checked, so this re-read only looks for it."""
    if fmt == "jsonl":
        with io.open(path, encoding="utf-8-sig", newline="\n") as fh:  # noqa: UP020
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    doc_id = str(json.loads(line)[document_column])
                    if doc_id not in known:
                        return doc_id, line_no
    else:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            at = [h.strip() for h in next(reader)].index(document_column)
            while True:
                line_no = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if row and row[at] not in known:
                    return row[at], line_no
    raise AssertionError("no pair refers to a missing document")  # pragma: no cover


def check_references(
    pairs_path: Path, pairs: ingest.Profile, documents: DocumentsProfile
) -> dict[str, int]:
    """Refuse pairs that name a document the knowledge base lacks (400 naming the first
    one and its line); the version's profile: pairs, distinct queries, documents and
    documents that no pair refers to."""
    referenced = set(pairs.labels)  # as written, like the documents' ids
    if not referenced <= documents.ids:
        doc_id, line = _first_missing(
            pairs_path, pairs.format, document_column=pairs.label_column, known=documents.ids
        )
        text = (
            f"line {line}: the document id {doc_id!r} is not in the documents file "
            f"({documents.count:,} documents)"
        )
        raise InvalidInput(text, code="unknown_document", fields={"file": [text]}, line=line)
    return {
        "pairs": pairs.rows,
        "distinct_queries": pairs.rows - pairs.duplicate_texts,
        "documents": documents.count,
        "unreferenced_documents": len(documents.ids - referenced),
    }

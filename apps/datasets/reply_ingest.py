"""Check and profile a reply corpus (task ``text-generation``): agent replies, each with the
customer message it answers when the file has a context column.

After the same byte scan as every upload (encoding, NUL bytes, over-long lines), the file
is read row by row with exact line numbers: every reply is split into words anyway (the
profile counts them with ``worker.autocomplete_text.words``, the one definition the models'
evaluation uses), so the classifier path's pyarrow fast lane would save little here: the
word split is most of the time. About 3 MB/s on one shared core (SGD's banks_1 train
replies x100, 11 MB, in 3.7 s): ~35 s for a 100 MB corpus, a million replies.

A blank reply is refused like a blank classifier text; a blank context is a reply without
one. Repeated replies are counted (``duplicate_texts``), not refused, as for classifier
data: agents really do repeat "Is there anything else I can help with?".
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apps.core.errors import InvalidInput
from apps.datasets import ingest
from worker import autocomplete_text

TEXT_FIELD, CONTEXT_FIELD = "text_column", "context_column"
DEFAULT_CONTEXT = "context"
HASH_CHUNK = 1_000_000


@dataclass
class RepliesProfile:
    """What a reply corpus's version records: ``context_column`` is ``""`` when the file
    has none; ``summary`` is the version's ``profile``."""

    format: str
    text_column: str
    context_column: str
    rows: int
    duplicate_texts: int
    preview: list[dict[str, str]]
    summary: dict[str, Any]


def _bad(message: str, *, code: str, line: int | None = None, field: str = "file") -> InvalidInput:
    text = f"line {line}: {message}" if line is not None else message
    return InvalidInput(text, code=code, fields={field: [text]}, line=line)


def _missing_text(name: str, found: str, *, line: int) -> InvalidInput:
    return _bad(
        f"missing the reply column {name!r}; the columns found are {found}. "
        f"Name the right one with '{TEXT_FIELD}'.",
        code="missing_column",
        line=line,
        field=TEXT_FIELD,
    )


def _missing_context(name: str, found: str, *, line: int) -> InvalidInput:
    return _bad(
        f"missing the context column {name!r}; the columns found are {found}. "
        f"Name the right one with '{CONTEXT_FIELD}', or leave it out for replies without "
        "context.",
        code="missing_column",
        line=line,
        field=CONTEXT_FIELD,
    )


def _csv_rows(
    path: Path, text_column: str, context_column: str | None
) -> tuple[str, Iterator[tuple[int, str, str]]]:
    """The context column the file is read by ("" for none) and its (line, reply, context)
    rows, values as written."""
    fh = path.open("r", encoding="utf-8-sig", newline="")
    reader = csv.reader(fh, strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        fh.close()
        raise _bad("the file is empty", code="empty") from None
    except csv.Error as exc:
        fh.close()
        raise _bad(f"the header is not valid CSV ({exc})", code="csv", line=1) from None
    found = ", ".join(repr(c) for c in header) or "none"
    if text_column not in header:
        fh.close()
        raise _missing_text(text_column, found, line=1)
    if context_column is None:  # the default: taken when the file has it
        context_column = DEFAULT_CONTEXT if DEFAULT_CONTEXT in header else ""
    elif context_column not in header:
        fh.close()
        raise _missing_context(context_column, found, line=1)
    t_idx = header.index(text_column)
    c_idx = header.index(context_column) if context_column else -1

    def rows() -> Iterator[tuple[int, str, str]]:
        with fh:
            while True:
                line = reader.line_num + 1  # a quoted value may span lines: where it starts
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise _bad(f"not valid CSV ({exc})", code="csv", line=line) from None
                if not row:
                    continue
                if len(row) != len(header):
                    raise _bad(
                        f"expected {len(header)} fields like the header, found {len(row)}",
                        code="csv",
                        line=line,
                    )
                yield line, row[t_idx], row[c_idx] if c_idx >= 0 else ""

    return context_column, rows()


def _jsonl_rows(
    path: Path, text_column: str, context_column: str | None, seen_context: list[bool]
) -> Iterator[tuple[int, str, str]]:
    """(line, reply, context) of each line. A JSON line may leave the context out (that
    reply has none); ``seen_context`` is set once a line has the context field."""
    name = context_column or DEFAULT_CONTEXT
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
            if text_column not in obj:
                found = ", ".join(repr(k) for k in obj) or "no fields"
                raise _missing_text(text_column, found, line=line_no)
            text, context = obj[text_column], obj.get(name)
            if not isinstance(text, str):
                raise _bad(
                    f"the reply ({text_column!r}) must be a string", code="json", line=line_no
                )
            if name in obj:
                seen_context[0] = True
            if context is None:  # absent or null: no context, like a blank one
                context = ""
            if not isinstance(context, str):
                raise _bad(
                    f"the context ({name!r}) must be a string or null", code="json", line=line_no
                )
            yield line_no, text, context


def profile_replies(
    path: Path,
    *,
    filename: str,
    fmt: str | None,
    text_column: str,
    context_column: str | None,
    max_line_bytes: int,
    first_nul: int | None = None,
) -> RepliesProfile:
    """Check a reply corpus completely; raise ``InvalidInput`` naming the first problem.

    ``context_column`` None: the ``context`` column when the file has one, else no
    context; a name: that column, which must exist.
    """
    if path.stat().st_size == 0:
        raise _bad("the file is empty", code="empty")
    ingest.scan_bytes(path, max_line_bytes=max_line_bytes, first_nul=first_nul)
    if context_column is not None and context_column == text_column:
        raise _bad("the reply and context columns must differ", code="invalid", field=CONTEXT_FIELD)
    fmt = ingest.detect_format(path, filename, fmt)
    seen_context = [False]
    if fmt == "jsonl":
        rows = _jsonl_rows(path, text_column, context_column, seen_context)
    else:
        context_column, rows = _csv_rows(path, text_column, context_column)

    replies = total_words = longest = with_context = 0
    vocabulary: set[str] = set()
    hashes: list[int] = []
    hash_chunks: list[np.ndarray[Any, Any]] = []
    preview: list[dict[str, str]] = []
    for line, text, context in rows:
        if not text.strip():
            raise _bad(f"the reply ({text_column!r}) is empty", code="empty_text", line=line)
        reply_words = autocomplete_text.words(text)
        total_words += len(reply_words)
        longest = max(longest, len(reply_words))
        vocabulary.update(reply_words)
        if context.strip():
            with_context += 1
        else:
            context = ""  # no context, as worker.reply_data reads it
        # Hashed as the classifier path hashes texts, and counted the same way.
        hashes.append(hash(text))
        if len(hashes) >= HASH_CHUNK:
            hash_chunks.append(np.array(hashes, dtype=np.int64))
            hashes = []
        if len(preview) < ingest.PREVIEW_ROWS:
            preview.append({"text": text, "context": context})
        replies += 1
    if hashes:
        hash_chunks.append(np.array(hashes, dtype=np.int64))
    if replies == 0:
        raise _bad(
            "the file has a header but no rows" if fmt == "csv" else "the file has no rows",
            code="empty",
        )
    if fmt == "jsonl":
        if context_column is not None and not seen_context[0]:
            raise _bad(
                f"no line has the context field {context_column!r}. Name the right one with "
                f"'{CONTEXT_FIELD}', or leave it out for replies without context.",
                code="missing_column",
                field=CONTEXT_FIELD,
            )
        context_column = (context_column or DEFAULT_CONTEXT) if seen_context[0] else ""
    return RepliesProfile(
        format=fmt,
        text_column=text_column,
        context_column=context_column or "",
        rows=replies,
        duplicate_texts=ingest._duplicates(hash_chunks),
        preview=preview,
        summary={
            "replies": replies,
            "words": total_words,
            "vocabulary_size": len(vocabulary),
            "longest_reply_words": longest,
            "with_context": with_context,
            "mean_reply_words": round(total_words / replies, 2),
        },
    )

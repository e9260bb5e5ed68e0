"""Reading reply corpora (task ``text-generation``): agent replies, each with the customer
message it answers (its context, optional), for training, evaluation and serving warm-up.

A text-generation version's file is read like a classifier's table
(:class:`~worker.training.config.DataSpec`): ``text_column`` names the reply column and
``label_column`` the context column, or is ``""`` when the file has none (the datasets app
stores exactly that on the version). The upload was checked completely before it was
stored (``apps.datasets.reply_ingest``); these readers still refuse what the checks would
have refused, so a file that reaches a worker some other way fails with its line number,
not with a silently wrong corpus. Pure Python: no Django, no torch.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.training.config import DataSpec
from worker.training.data import DataError

DEFAULT_TEXT_COLUMN = "text"
DEFAULT_CONTEXT_COLUMN = "context"


@dataclass(frozen=True)
class Reply:
    """One reply as typed by an agent, and the message it answers ("" without one)."""

    text: str
    context: str = ""


def read_replies(spec: DataSpec) -> list[Reply]:
    """Every reply of a text-generation version's file, in file order.

    ``spec.label_column`` is the version's context column; ``""`` reads every reply with
    no context.
    """
    return read_reply_file(
        spec.path,
        spec.format,
        text_column=spec.text_column,
        context_column=spec.label_column,
    )


def read_reply_file(
    path: Path,
    format: str = "csv",
    *,
    text_column: str = DEFAULT_TEXT_COLUMN,
    context_column: str | None = None,
) -> list[Reply]:
    """Every reply of ``path`` (``format`` csv or jsonl), in file order.

    ``context_column``: ``None`` takes the ``context`` column when the file has one (a
    shared corpus read directly, as the benchmarks do); ``""`` reads no context; a name
    must be a column of a CSV file (a JSON line without it has no context). A blank reply
    is an error naming its line; a blank or absent context is a reply without one.
    """
    replies: list[Reply] = []
    rows = _rows(path, format)
    if format == "csv":  # the header says which columns there are
        header = next(rows)[1]
        if text_column not in header:
            raise DataError(f"{path.name} has no reply column {text_column!r}")
        if context_column is None:
            context_column = DEFAULT_CONTEXT_COLUMN if DEFAULT_CONTEXT_COLUMN in header else ""
        if context_column and context_column not in header:
            raise DataError(f"{path.name} has no context column {context_column!r}")
    elif context_column is None:
        context_column = DEFAULT_CONTEXT_COLUMN
    for line, row in rows:
        if text_column not in row:
            raise DataError(f"{path.name} line {line}: no reply field {text_column!r}")
        text = row[text_column]
        # A JSON line may leave the context out: that reply has none.
        context = row.get(context_column) if context_column else ""
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path.name} line {line}: the reply is empty or not a string")
        if context is None:  # JSON null: no context, like a blank one
            context = ""
        if not isinstance(context, str):
            raise DataError(f"{path.name} line {line}: the context is not a string")
        # A blank context is no context (the upload counts it so): no whitespace-only
        # prompt for a model to condition on.
        replies.append(Reply(text=text, context=context if context.strip() else ""))
    if not replies:
        raise DataError(f"{path.name} has no replies")
    return replies


def _rows(path: Path, format: str) -> Iterator[tuple[int, dict[str, object]]]:
    """(line, row) of each non-blank row; CSV values are strings, JSON ones as written. A
    CSV file's first item is (1, its header as a row of empty values)."""
    if format == "jsonl":
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
                yield number, row
        return
    if format != "csv":
        raise DataError(f"unsupported data format {format!r}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path.name} is empty") from None
        yield 1, dict.fromkeys(header, "")
        while True:
            # The line a row starts on: a quoted reply may span several lines.
            number = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path.name} line {number}: invalid CSV ({exc})") from exc
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path.name} line {number}: {len(row)} fields, the header has {len(header)}"
                )
            yield number, dict(zip(header, row, strict=True))


def split_replies(
    replies: list[Reply], fraction: float, seed: int
) -> tuple[list[Reply], list[Reply]]:
    """Hold out ``fraction`` of the distinct reply texts (every copy of a held-out reply
    goes with it, so no validation reply was trained on: SGD's agents repeat stock replies
    such as "Is there anything else I can help you with?" hundreds of times). Depends only
    on the replies and the seed; both sides keep file order."""
    texts = sorted({r.text for r in replies})
    if len(texts) < 2:
        raise DataError("too few distinct replies to hold out a validation split")
    rng = random.Random(seed)
    rng.shuffle(texts)
    count = min(len(texts) - 1, max(1, round(len(texts) * fraction)))
    held_out = set(texts[:count])
    train = [r for r in replies if r.text not in held_out]
    validation = [r for r in replies if r.text in held_out]
    return train, validation

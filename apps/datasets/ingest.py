"""Check and profile an uploaded dataset file without holding it in memory.

Two passes over the file on local disk:

1. ``scan_bytes``: UTF-8 validity and the longest physical line, in 4 MiB chunks at C
   speed (pure-ASCII chunks skip decoding; ``bytes.rfind`` jumps a line-length window
   along, numpy names the line when one is too long), any size.
2. Parse and profile: CSV through pyarrow's multi-threaded streaming reader, JSONL line by
   line. The result is the row count, label counts, duplicate texts and a preview.
   pyarrow reads up to 32 blocks ahead, so the blocks are small (memory stays flat); a
   file whose quoted rows outgrow a small block is read again with large blocks.

When the fast CSV path meets anything wrong, ``reference_check_csv`` (the stdlib ``csv``
module, row by row) re-reads the file to name the first problem with its line number, so
errors are exact without slowing down the files that are fine.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apps.core.errors import InvalidInput

CHUNK = 4 * 1024 * 1024
# pyarrow's streaming CSV reader keeps up to 32 blocks in flight: 256 KiB blocks hold the
# reader near 50 MB where 16 MiB blocks took ~500 MB. A row that does not fit in one block
# (quoted newlines) makes pyarrow stop with "straddling object"; that file is read again
# with the large blocks.
CSV_BLOCK_SIZE = 256 * 1024
CSV_LARGE_BLOCK_SIZE = 16 * 1024 * 1024
PREVIEW_ROWS = 5
BOM = codecs.BOM_UTF8


@dataclass
class Profile:
    format: str
    text_column: str
    label_column: str
    columns: list[str]
    rows: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    duplicate_texts: int = 0
    preview: list[dict[str, str]] = field(default_factory=list)


def _bad(
    message: str, *, code: str, line: int | None = None, field_name: str = "file"
) -> InvalidInput:
    text = f"line {line}: {message}" if line is not None else message
    return InvalidInput(text, code=code, fields={field_name: [text]}, line=line)


def line_of_offset(path: Path, offset: int) -> int:
    """1-based line number of the byte at ``offset``."""
    lines = 1
    with path.open("rb") as fh:
        remaining = offset
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            remaining -= len(chunk)
    return lines


def _has_long_line(chunk: bytes, open_len: int, max_line_bytes: int) -> bool:
    """Whether a line in ``chunk`` (the first one ``open_len`` bytes long already) is too long.

    Jumps from line start to the last newline within ``max_line_bytes`` + 1 bytes: short
    lines cost one ``rfind`` per ``max_line_bytes``, not one step each.
    """
    start = -open_len  # where the line that is open at the chunk's start began
    while start + max_line_bytes < len(chunk):
        newline = chunk.rfind(b"\n", max(start, 0), start + max_line_bytes + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False


def _raise_longest_line(chunk: bytes, open_len: int, max_line_bytes: int, line: int) -> None:
    """Name the longest line of a chunk known to hold one over the limit."""
    newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    if newlines.size == 0:
        longest_len, longest_idx = open_len + len(chunk), 0
    else:
        lengths = np.diff(newlines, prepend=-1)  # line bytes incl. the newline
        lengths[0] += open_len
        longest_idx = int(lengths.argmax())
        longest_len = int(lengths[longest_idx]) - 1
        tail = len(chunk) - int(newlines[-1]) - 1
        if tail > longest_len:
            longest_len, longest_idx = tail, int(newlines.size)
    if longest_len > max_line_bytes:
        raise _bad(
            f"the line is longer than the limit of {max_line_bytes:,} bytes",
            code="line_too_long",
            line=line + longest_idx,
        )


def scan_bytes(path: Path, *, max_line_bytes: int, first_nul: int | None = None) -> None:
    """Refuse binary files, invalid UTF-8 and over-long lines, naming the line."""
    if first_nul is not None:
        raise _bad(
            "the file contains a NUL byte: this looks like a binary file, not CSV or JSONL text",
            code="binary",
            line=line_of_offset(path, first_nul),
        )
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line = 1
    current_line_len = 0  # bytes of the line still open at the end of the previous chunk
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            # ASCII is valid UTF-8: decode only other chunks, or one that must finish a
            # character the previous chunk started.
            if not chunk.isascii() or decoder.getstate()[0]:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    bad_at = exc.start
                    line_no = line + chunk.count(b"\n", 0, bad_at)
                    raise _bad(
                        "the file is not valid UTF-8 text (re-save it as UTF-8)",
                        code="encoding",
                        line=line_no,
                    ) from None
            if _has_long_line(chunk, current_line_len, max_line_bytes):
                _raise_longest_line(chunk, current_line_len, max_line_bytes, line)
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                current_line_len += len(chunk)
            else:
                current_line_len = len(chunk) - last_newline - 1
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _bad(
                "the file is not valid UTF-8 text (it ends inside a character)",
                code="encoding",
                line=line,
            ) from None


def detect_format(path: Path, filename: str, requested: str | None) -> str:
    if requested:
        return requested
    lowered = filename.lower()
    if lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lowered.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(BOM).lstrip()
    return "jsonl" if head.startswith(b"{") else "csv"


def _check_labels(labels: dict[str, int], *, need_two_labels: bool) -> None:
    if need_two_labels and len(labels) < 2:
        only = next(iter(labels), "")
        raise _bad(
            f"a training set needs at least 2 different labels; every row has the label '{only}'",
            code="single_label",
        )


def _duplicates(hash_chunks: list[np.ndarray[Any, Any]]) -> int:
    """Rows whose text hash appeared before. Empties ``hash_chunks`` as it copies them, so
    the hashes are held once, not twice."""
    if not hash_chunks:
        return 0
    hashes = np.empty(sum(len(c) for c in hash_chunks), dtype=np.int64)
    at = 0
    hash_chunks.reverse()
    while hash_chunks:
        chunk = hash_chunks.pop()
        hashes[at : at + len(chunk)] = chunk
        at += len(chunk)
    hashes.sort()
    return int(np.count_nonzero(hashes[1:] == hashes[:-1]))


# --- CSV --------------------------------------------------------------------------------


def _csv_header(path: Path) -> list[str]:
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        try:
            header = next(csv.reader(fh))
        except StopIteration:
            raise _bad("the file is empty", code="empty") from None
        except csv.Error as exc:
            raise _bad(f"the header is not valid CSV ({exc})", code="csv", line=1) from None
    return [h.strip() for h in header]


def _check_columns(columns: list[str], text_column: str, label_column: str) -> None:
    found = ", ".join(repr(c) for c in columns) or "none"
    for role, name in (("text", text_column), ("label", label_column)):
        if name not in columns:
            raise _bad(
                f"missing the {role} column {name!r}; the columns found are {found}. "
                f"Name the right one with '{role}_column'.",
                code="missing_column",
                line=1,
                field_name=f"{role}_column",
            )
    if text_column == label_column:
        raise _bad(
            "the text and label columns must differ", code="invalid", field_name="label_column"
        )


def reference_check_csv(path: Path, *, text_column: str, label_column: str) -> None:
    """Row-by-row CSV check with exact line numbers; raises on the first problem."""
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        header = [h.strip() for h in next(reader)]
        t_idx, l_idx = header.index(text_column), header.index(label_column)
        width = len(header)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _bad(f"not valid CSV ({exc})", code="csv", line=line) from None
            if not row:
                continue
            if len(row) != width:
                raise _bad(
                    f"expected {width} fields like the header, found {len(row)}",
                    code="csv",
                    line=line,
                )
            if not row[t_idx].strip():
                raise _bad(f"the text ({text_column!r}) is empty", code="empty_text", line=line)
            if not row[l_idx].strip():
                raise _bad(f"the label ({label_column!r}) is empty", code="empty_label", line=line)


def profile_csv(
    path: Path, *, text_column: str, label_column: str, need_two_labels: bool
) -> Profile:
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    columns = _csv_header(path)
    _check_columns(columns, text_column, label_column)
    profile = Profile(
        format="csv", text_column=text_column, label_column=label_column, columns=columns
    )

    def fail_precisely(fallback: str) -> InvalidInput:
        reference_check_csv(path, text_column=text_column, label_column=label_column)
        return _bad(fallback, code="csv")

    raw_names = _raw_header(path)
    text_raw, label_raw = (
        raw_names[columns.index(text_column)],
        raw_names[columns.index(label_column)],
    )
    labels: Counter[str] = Counter()
    hash_chunks: list[np.ndarray[Any, Any]] = []

    def is_blank(values: Any) -> bool:
        # Same as "length of the whitespace-trimmed value is 0" (checked for every code
        # point), without building the trimmed copy of every text.
        return bool(
            pc.any(pc.utf8_is_space(values)).as_py()
            or pc.min(pc.binary_length(values)).as_py() == 0
        )

    def read(block_size: int) -> None:
        reader = pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(block_size=block_size, use_threads=True),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=[text_raw, label_raw],
                column_types={text_raw: pa.string(), label_raw: pa.string()},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        for batch in reader:
            if batch.num_rows == 0:
                continue
            texts = batch.column(text_raw)
            batch_labels = batch.column(label_raw)
            if is_blank(texts):
                raise fail_precisely("a text is empty")
            if is_blank(batch_labels):
                raise fail_precisely("a label is empty")
            counts = pc.value_counts(batch_labels)
            for value, count in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            ):
                labels[value] += count
            hash_chunks.append(
                np.fromiter(map(hash, texts.to_pylist()), dtype=np.int64, count=batch.num_rows)
            )
            if len(profile.preview) < PREVIEW_ROWS:
                take = PREVIEW_ROWS - len(profile.preview)
                profile.preview.extend(
                    {"text": t, "label": lb}
                    for t, lb in zip(
                        texts.slice(0, take).to_pylist(),
                        batch_labels.slice(0, take).to_pylist(),
                        strict=True,
                    )
                )
            profile.rows += batch.num_rows

    try:
        try:
            read(CSV_BLOCK_SIZE)
        except pa.ArrowInvalid as exc:
            if "straddling" not in str(exc):
                raise
            # A row longer than a small block: start again with the large ones.
            labels.clear()
            hash_chunks.clear()
            profile.preview.clear()
            profile.rows = 0
            read(CSV_LARGE_BLOCK_SIZE)
    except pa.ArrowInvalid as exc:
        raise fail_precisely(f"not valid CSV ({str(exc).splitlines()[0]})") from None
    if profile.rows == 0:
        raise _bad("the file has a header but no rows", code="empty")
    profile.labels = dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
    profile.duplicate_texts = _duplicates(hash_chunks)
    _check_labels(profile.labels, need_two_labels=need_two_labels)
    return profile


def _raw_header(path: Path) -> list[str]:
    # pyarrow names columns exactly as written (minus a BOM); we strip spaces for users.
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        return next(csv.reader(fh))


# --- JSON lines -------------------------------------------------------------------------


def profile_jsonl(
    path: Path, *, text_column: str, label_column: str, need_two_labels: bool
) -> Profile:
    if text_column == label_column:
        raise _bad(
            "the text and label columns must differ", code="invalid", field_name="label_column"
        )
    profile = Profile(
        format="jsonl", text_column=text_column, label_column=label_column, columns=[]
    )
    labels: Counter[str] = Counter()
    hashes: list[int] = []
    hash_chunks: list[np.ndarray[Any, Any]] = []
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
            if not profile.columns:
                profile.columns = list(obj)
            for role, name in (("text", text_column), ("label", label_column)):
                if name not in obj:
                    raise _bad(
                        f"missing the {role} field {name!r}; this line has "
                        f"{', '.join(repr(k) for k in obj) or 'no fields'}. "
                        f"Name the right one with '{role}_column'.",
                        code="missing_column",
                        line=line_no,
                        field_name=f"{role}_column",
                    )
            text, label = obj[text_column], obj[label_column]
            if not isinstance(text, str):
                raise _bad(
                    f"the text ({text_column!r}) must be a string", code="json", line=line_no
                )
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise _bad(
                    f"the label ({label_column!r}) must be a string or an integer",
                    code="json",
                    line=line_no,
                )
            label = str(label)
            if not text.strip():
                raise _bad(f"the text ({text_column!r}) is empty", code="empty_text", line=line_no)
            if not label.strip():
                raise _bad(
                    f"the label ({label_column!r}) is empty", code="empty_label", line=line_no
                )
            labels[label] += 1
            hashes.append(hash(text))
            if len(hashes) >= 1_000_000:
                hash_chunks.append(np.array(hashes, dtype=np.int64))
                hashes = []
            if len(profile.preview) < PREVIEW_ROWS:
                profile.preview.append({"text": text, "label": label})
            profile.rows += 1
    if hashes:
        hash_chunks.append(np.array(hashes, dtype=np.int64))
    if profile.rows == 0:
        raise _bad("the file has no rows", code="empty")
    profile.labels = dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
    profile.duplicate_texts = _duplicates(hash_chunks)
    _check_labels(profile.labels, need_two_labels=need_two_labels)
    return profile


def profile_file(
    path: Path,
    *,
    filename: str,
    fmt: str | None,
    text_column: str,
    label_column: str,
    need_two_labels: bool,
    max_line_bytes: int,
    first_nul: int | None = None,
) -> Profile:
    """Check an uploaded file completely; raise ``InvalidInput`` naming the first problem."""
    if path.stat().st_size == 0:
        raise _bad("the file is empty", code="empty")
    scan_bytes(path, max_line_bytes=max_line_bytes, first_nul=first_nul)
    fmt = detect_format(path, filename, fmt)
    if fmt == "jsonl":
        return profile_jsonl(
            path,
            text_column=text_column,
            label_column=label_column,
            need_two_labels=need_two_labels,
        )
    return profile_csv(
        path, text_column=text_column, label_column=label_column, need_two_labels=need_two_labels
    )

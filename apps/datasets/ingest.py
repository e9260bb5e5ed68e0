"""Check and profile an uploaded dataset file without holding it in memory.

Two passes over the file on local disk:

1. ``scan_bytes``: UTF-8 validity and the longest physical line, in 4 MiB chunks at C
   speed (pure-ASCII chunks skip decoding; ``bytes.rfind`` jumps a line-length window
   along, numpy names the line when one is too long), any size.
2. Parse and profile: CSV through pyarrow's multi-threaded streaming reader, JSONL line by
   line. The result is the row count, label counts, duplicate texts and a preview.
   pyarrow reads up to 32 blocks ahead, so the blocks are small (memory stays flat); a
   file the small blocks do not take cleanly is read again with large blocks.

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
# reader near 50 MB where 16 MiB blocks took ~500 MB. A file the small blocks do not take
# cleanly (a row longer than a block, bad CSV, an empty cell) is read again with the large
# blocks, so its outcome and error message are exactly those of the large blocks.
CSV_BLOCK_SIZE = 256 * 1024
CSV_LARGE_BLOCK_SIZE = 16 * 1024 * 1024
CSV_GROUP_BYTES = 1024 * 1024  # small blocks are checked in groups of about this size
PREVIEW_ROWS = 5
BOM = codecs.BOM_UTF8
# What the two columns are called in messages: a retrieval pairs file's "text" is its
# query and its "label" the document id (the fields stay text_column / label_column).
Roles = tuple[str, str]
CLASSIFICATION_ROLES: Roles = ("text", "label")


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


def _is_utf8(data: memoryview) -> bool:
    """Whether ``data`` is valid UTF-8, with pyarrow's validator: ~8x faster than decoding.

    It accepts exactly what CPython's strict decoder accepts (checked over every sequence of
    up to 3 bytes, the 4-byte ones around the limits and random longer ones); a chunk it
    refuses is decoded by CPython anyway, which names the error.
    """
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    array = pa.StringArray.from_buffers(1, offsets, pa.py_buffer(data))
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _last_char_start(chunk: bytes) -> int:
    """Where the chunk's last character starts if it may be incomplete, else ``len(chunk)``."""
    at = len(chunk) - 1
    while at > len(chunk) - 4 and at >= 0 and 0x80 <= chunk[at] <= 0xBF:
        at -= 1  # continuation bytes
    return at if at >= 0 and chunk[at] >= 0xC0 else len(chunk)


def scan_bytes(path: Path, *, max_line_bytes: int, first_nul: int | None = None) -> None:
    """Refuse binary files, invalid UTF-8 and over-long lines, naming the line."""
    if first_nul is not None:
        raise _bad(
            "the file contains a NUL byte: this looks like a binary file, not CSV or JSONL text",
            code="binary",
            line=line_of_offset(path, first_nul),
        )
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes before this chunk; line numbers are counted only for an error
    current_line_len = 0  # bytes of the line still open at the end of the previous chunk
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            # Checked as if the incremental decoder read it all, only faster.
            if decoder.getstate()[0]:  # a character split across chunks: the decoder ends it
                to_decode, skipped = chunk, 0
            elif chunk.isascii():  # ASCII is UTF-8
                to_decode, skipped = b"", 0
            else:
                cut = _last_char_start(chunk)
                if _is_utf8(memoryview(chunk)[:cut]):  # the decoder keeps the last character
                    to_decode, skipped = chunk[cut:], cut
                else:  # the decoder names the error
                    to_decode, skipped = chunk, 0
            if to_decode:
                try:
                    decoder.decode(to_decode)
                except UnicodeDecodeError as exc:
                    bad_at = skipped + exc.start
                    line_no = line_of_offset(path, offset) + chunk.count(b"\n", 0, bad_at)
                    raise _bad(
                        "the file is not valid UTF-8 text (re-save it as UTF-8)",
                        code="encoding",
                        line=line_no,
                    ) from None
            if _has_long_line(chunk, current_line_len, max_line_bytes):
                _raise_longest_line(
                    chunk, current_line_len, max_line_bytes, line_of_offset(path, offset)
                )
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                current_line_len += len(chunk)
            else:
                current_line_len = len(chunk) - last_newline - 1
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _bad(
                "the file is not valid UTF-8 text (it ends inside a character)",
                code="encoding",
                line=line_of_offset(path, offset),
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
    """Rows whose text hash appeared before (the chunks are sorted in place).

    Equal hashes lie in the same range of values, so the count is taken range by range
    (16 of them): at most 1/16 of the hashes is copied at once, not all of them.
    """
    for chunk in hash_chunks:
        chunk.sort()
    taken = [0] * len(hash_chunks)
    duplicates = 0
    for bucket in range(1, 17):
        bound = np.int64(-(2**63) + bucket * 2**60) if bucket < 16 else None
        parts = []
        for i, chunk in enumerate(hash_chunks):
            end = len(chunk) if bound is None else int(np.searchsorted(chunk, bound))
            parts.append(chunk[taken[i] : end])
            taken[i] = end
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        hashes.sort()
        duplicates += int(np.count_nonzero(hashes[1:] == hashes[:-1]))
    return duplicates


class _Reread(Exception):
    """The small-block CSV pass met something it leaves to the large-block pass."""


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


def _check_columns(
    columns: list[str], text_column: str, label_column: str, roles: Roles = CLASSIFICATION_ROLES
) -> None:
    found = ", ".join(repr(c) for c in columns) or "none"
    for role, field_role, name in zip(
        roles, CLASSIFICATION_ROLES, (text_column, label_column), strict=True
    ):
        if name not in columns:
            raise _bad(
                f"missing the {role} column {name!r}; the columns found are {found}. "
                f"Name the right one with '{field_role}_column'.",
                code="missing_column",
                line=1,
                field_name=f"{field_role}_column",
            )
    if text_column == label_column:
        raise _bad(
            f"the {roles[0]} and {roles[1]} columns must differ",
            code="invalid",
            field_name="label_column",
        )


def reference_check_csv(
    path: Path, *, text_column: str, label_column: str, roles: Roles = CLASSIFICATION_ROLES
) -> None:
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
                raise _bad(
                    f"the {roles[0]} ({text_column!r}) is empty", code="empty_text", line=line
                )
            if not row[l_idx].strip():
                raise _bad(
                    f"the {roles[1]} ({label_column!r}) is empty", code="empty_label", line=line
                )


def profile_csv(
    path: Path,
    *,
    text_column: str,
    label_column: str,
    need_two_labels: bool,
    roles: Roles = CLASSIFICATION_ROLES,
) -> Profile:
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    columns = _csv_header(path)
    _check_columns(columns, text_column, label_column, roles)
    profile = Profile(
        format="csv", text_column=text_column, label_column=label_column, columns=columns
    )

    def fail_precisely(fallback: str) -> InvalidInput:
        reference_check_csv(path, text_column=text_column, label_column=label_column, roles=roles)
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

    def take(texts: Any, batch_labels: Any, rows: int, *, decides: bool) -> None:
        if is_blank(texts):
            raise fail_precisely(f"a {roles[0]} is empty") if decides else _Reread()
        if is_blank(batch_labels):
            raise fail_precisely(f"a {roles[1]} is empty") if decides else _Reread()
        counts = pc.value_counts(batch_labels)
        for value, count in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
        ):
            labels[value] += count
        # Hashed as UTF-8 bytes (equal texts, equal bytes): cheaper to make than str objects.
        as_bytes = texts.cast(pa.binary()).to_pylist()
        hash_chunks.append(np.fromiter(map(hash, as_bytes), dtype=np.int64, count=rows))
        if len(profile.preview) < PREVIEW_ROWS:
            wanted = PREVIEW_ROWS - len(profile.preview)
            profile.preview.extend(
                {"text": t, "label": lb}
                for t, lb in zip(
                    texts.slice(0, wanted).to_pylist(),
                    batch_labels.slice(0, wanted).to_pylist(),
                    strict=True,
                )
            )
        profile.rows += rows

    def take_group(group: list[Any]) -> None:
        table = pa.Table.from_batches(group)  # no copy: each column is the batches' chunks
        take(table.column(text_raw), table.column(label_raw), table.num_rows, decides=False)

    def read(block_size: int, *, decides: bool) -> None:
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
        group: list[Any] = []  # small blocks are checked a few at a time: fewer calls
        group_bytes = 0
        for batch in reader:
            if batch.num_rows == 0:
                continue
            if decides:
                take(batch.column(text_raw), batch.column(label_raw), batch.num_rows, decides=True)
                continue
            group.append(batch)
            group_bytes += batch.nbytes
            if group_bytes >= CSV_GROUP_BYTES:
                take_group(group)
                group, group_bytes = [], 0
        if group:
            take_group(group)

    try:
        try:
            read(CSV_BLOCK_SIZE, decides=False)
        except (pa.ArrowInvalid, _Reread):
            # Anything amiss (a row longer than a small block, bad CSV, an empty cell): read
            # again with the large blocks, where every outcome is decided as it always was.
            labels.clear()
            hash_chunks.clear()
            profile.preview.clear()
            profile.rows = 0
            read(CSV_LARGE_BLOCK_SIZE, decides=True)
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
    path: Path,
    *,
    text_column: str,
    label_column: str,
    need_two_labels: bool,
    roles: Roles = CLASSIFICATION_ROLES,
) -> Profile:
    if text_column == label_column:
        raise _bad(
            f"the {roles[0]} and {roles[1]} columns must differ",
            code="invalid",
            field_name="label_column",
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
            for role, field_role, name in zip(
                roles, CLASSIFICATION_ROLES, (text_column, label_column), strict=True
            ):
                if name not in obj:
                    raise _bad(
                        f"missing the {role} field {name!r}; this line has "
                        f"{', '.join(repr(k) for k in obj) or 'no fields'}. "
                        f"Name the right one with '{field_role}_column'.",
                        code="missing_column",
                        line=line_no,
                        field_name=f"{field_role}_column",
                    )
            text, label = obj[text_column], obj[label_column]
            if not isinstance(text, str):
                raise _bad(
                    f"the {roles[0]} ({text_column!r}) must be a string", code="json", line=line_no
                )
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise _bad(
                    f"the {roles[1]} ({label_column!r}) must be a string or an integer",
                    code="json",
                    line=line_no,
                )
            label = str(label)
            if not text.strip():
                raise _bad(
                    f"the {roles[0]} ({text_column!r}) is empty", code="empty_text", line=line_no
                )
            if not label.strip():
                raise _bad(
                    f"the {roles[1]} ({label_column!r}) is empty", code="empty_label", line=line_no
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
    roles: Roles = CLASSIFICATION_ROLES,
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
            roles=roles,
        )
    return profile_csv(
        path,
        text_column=text_column,
        label_column=label_column,
        need_two_labels=need_two_labels,
        roles=roles,
    )

"""Keyset ("seek") pagination for the lists that grow without bound (the audit log).

A page is found by the position of the row before it — ``WHERE (created_at, id) < (t, i)``
on the list's index — not by an offset the database must walk, so page 20,000 costs what
page 1 does; and the list is counted only up to ``COUNT_CAP`` rows (an exact count of a
million rows is a scan on every request). ``?page=N`` still works within the cap, for
links and clients that page by number; past it the answer says to follow ``next``.

Cursors are opaque (base64url JSON of the direction and the boundary row's created_at and
id); the list must be ordered newest first by ``(created_at, id)``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Model, Q, QuerySet
from django.utils.dateparse import parse_datetime

from apps.core.errors import InvalidInput

COUNT_CAP = 10_000
NEWEST_FIRST = ("-created_at", "-id")
OLDEST_FIRST = ("created_at", "id")


@dataclass
class KeysetPage:
    rows: list[Any]
    count: int  # exact when ``count_exact``, else COUNT_CAP: "more than that"
    count_exact: bool
    next_cursor: str | None
    previous_cursor: str | None
    number: int | None  # the page number when asked by number (or the first page)


def _encode(direction: str, row: Model) -> str:
    created_at: datetime = row.created_at  # type: ignore[attr-defined]
    raw = json.dumps({"d": direction, "t": created_at.isoformat(), "i": str(row.pk)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[str, datetime, str]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        direction, moment, pk = raw["d"], parse_datetime(raw["t"]), str(raw["i"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        direction, moment, pk = "", None, ""
    if direction not in ("n", "p") or moment is None or not pk:
        raise InvalidInput(
            "This cursor is not one this list gave out: follow the list's next and previous "
            "links as they are.",
            code="invalid_cursor",
            fields={"cursor": ["Not a cursor of this list."]},
        )
    return direction, moment, pk


def keyset_page(
    queryset: QuerySet[Any], *, size: int, cursor: str | None = None, page: str | None = None
) -> KeysetPage:
    """One page of ``queryset`` (newest first): after or before ``cursor``, or page number
    ``page`` (within ``COUNT_CAP`` rows), or the first. Three queries at most."""
    newest = queryset.order_by(*NEWEST_FIRST)
    counted = queryset.order_by()[: COUNT_CAP + 1].count()  # counting needs no order
    count, exact = min(counted, COUNT_CAP), counted <= COUNT_CAP
    if cursor:
        direction, moment, pk = _decode(cursor)
        if direction == "n":  # older than the boundary row
            after = Q(created_at__lt=moment) | Q(created_at=moment, pk__lt=pk)
            rows = list(newest.filter(after)[: size + 1])
            more = len(rows) > size
            rows = rows[:size]
            newer = Q(created_at__gt=moment) | Q(created_at=moment, pk__gte=pk)
            has_previous = newest.filter(newer).exists()
            return KeysetPage(
                rows, count, exact,
                _encode("n", rows[-1]) if more and rows else None,
                _encode("p", rows[0]) if rows and has_previous else None,
                None,
            )  # fmt: skip
        before = Q(created_at__gt=moment) | Q(created_at=moment, pk__gt=pk)
        rows = list(queryset.order_by(*OLDEST_FIRST).filter(before)[: size + 1])
        more = len(rows) > size
        rows = list(reversed(rows[:size]))
        return KeysetPage(
            rows, count, exact,
            _encode("n", rows[-1]) if rows else None,
            _encode("p", rows[0]) if more and rows else None,
            None,
        )  # fmt: skip
    number = 1
    if page not in (None, ""):
        try:
            number = int(str(page))
        except ValueError:
            number = 0
        if number < 1:
            raise InvalidInput(
                "page must be a whole number from 1.", code="invalid_page",
                fields={"page": ["A whole number from 1."]},
            )  # fmt: skip
        if (number - 1) * size >= COUNT_CAP:
            raise InvalidInput(
                f"Pages by number reach the first {COUNT_CAP:,} rows; further on, follow the "
                "list's next links (a cursor finds any page as fast as the first).",
                code="page_beyond_count_cap",
                fields={"page": [f"At most {(COUNT_CAP - 1) // size + 1} at this page size."]},
            )
    rows = list(newest[(number - 1) * size : number * size + 1])
    more = len(rows) > size
    rows = rows[:size]
    return KeysetPage(
        rows, count, exact,
        _encode("n", rows[-1]) if more and rows else None,
        _encode("p", rows[0]) if number > 1 and rows else None,
        number,
    )  # fmt: skip

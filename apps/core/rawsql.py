"""Hot-path reads in one round trip, without the ORM's per-query compile step.

Building a query through the ORM costs 1 to 2 ms of Python per query on a small CPU before
the database sees it; a predict request made four of them, more than its model's forward
pass. ``fetch`` runs a hand-written ``FROM ... WHERE ...`` over the concrete columns of the
models named, converts each value exactly as the ORM would (the backend's and the field's
converters, so SQLite datetimes come back aware) and builds model instances with
``Model.from_db``, joined ones attached as if by ``select_related``. The column list, the
converters and the SQL fragments (``table``, ``column``, ``join``, ``equals``) are worked out
once and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection, models

Converter = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class Part:
    """A model selected under a table alias; ``attach`` puts it on an earlier part's
    foreign key ``(part index, field name)``, as ``select_related`` would."""

    model: type[models.Model]
    alias: str
    attach: tuple[int, str] | None = None


@functools.cache
def _layout(
    model: type[models.Model], alias: str
) -> tuple[str, list[str], list[tuple[Any, ...]], int]:
    """(the select list, the attribute names, each column's converters, the pk's index)."""
    quote = connection.ops.quote_name
    fields = list(model._meta.concrete_fields)
    select = ", ".join(f"{quote(alias)}.{quote(str(field.column))}" for field in fields)
    converters = []
    for field in fields:
        column = field.get_col(alias)
        found = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        converters.append((column, found))
    attnames = [field.attname for field in fields]
    return select, attnames, converters, attnames.index(model._meta.pk.attname)


def fetch(
    parts: Sequence[Part], tail: str, params: Sequence[Any]
) -> list[tuple[models.Model | None, ...]]:
    """``SELECT <every column of parts> <tail>``; one tuple of instances per row (None for a
    part whose primary key is NULL: an outer join that found nothing)."""
    layouts = [_layout(part.model, part.alias) for part in parts]
    sql = f"SELECT {', '.join(layout[0] for layout in layouts)} {tail}"
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        rows = cursor.fetchall()
    result = []
    for row in rows:
        instances: list[models.Model | None] = []
        start = 0
        for part, (_, attnames, converters, pk_index) in zip(parts, layouts, strict=True):
            values = list(row[start : start + len(attnames)])
            start += len(attnames)
            for i, (column, found) in enumerate(converters):
                for convert in found:
                    values[i] = convert(values[i], column, connection)
            instance = (
                None
                if values[pk_index] is None
                else part.model.from_db(connection.alias, attnames, values)
            )
            if part.attach is not None:
                owner = instances[part.attach[0]]
                if owner is not None:
                    related: Any = owner._meta.get_field(part.attach[1])
                    related.set_cached_value(owner, instance)
            instances.append(instance)
        result.append(tuple(instances))
    return result


@functools.cache
def table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


@functools.cache
def column(model: type[models.Model], name: str) -> str:
    field: Any = model._meta.get_field(name)
    return connection.ops.quote_name(str(field.column))


@functools.cache
def join(part: Part, owner: Part, field: str, *, outer: bool = False) -> str:
    """``JOIN <part's table> <alias> ON <alias>.<pk> = <owner alias>.<owner's field>``."""
    pk = connection.ops.quote_name(str(part.model._meta.pk.column))
    kind = "LEFT JOIN" if outer else "JOIN"
    return (
        f"{kind} {table(part.model)} {part.alias} "
        f"ON {part.alias}.{pk} = {owner.alias}.{column(owner.model, field)}"
    )


@functools.cache
def equals(part: Part, *fields: str) -> str:
    """``<alias>.<field> = %s AND ...`` for each field."""
    return " AND ".join(f"{part.alias}.{column(part.model, name)} = %s" for name in fields)

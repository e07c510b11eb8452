"""Hand-written SQL on the hot paths, read back into model instances.

The claim request (``POST /api/v2/workspaces`` with a preset) runs a handful of small
statements. Compiling them with the ORM cost more CPU than PostgreSQL spent running them
(``select_related`` over four tables is about a millisecond per request), and on a small
machine that CPU is what bounds claims per second. So the few statements every claim runs are
written out once, and their rows become ordinary model instances here, exactly as the ORM
would build them (``from_db``, field converters applied: JSON decoded), so callers still work
with models and nothing downstream knows the difference.

Everything else keeps using the ORM; this is for statements measured to matter
(``benchmarks.claim``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections, models
from django.db.models.sql import InsertQuery

M = TypeVar("M", bound=models.Model)


class Columns(Generic[M]):
    """The concrete columns of ``model`` (minus ``exclude``), as a select list and a loader.

    Excluded fields are deferred on the loaded instance (read on access, as ``.defer()`` does).
    """

    def __init__(self, model: type[M], exclude: Sequence[str] = ()) -> None:
        self.model = model
        self.fields = tuple(f for f in model._meta.concrete_fields if f.name not in exclude)
        self.attnames = [f.attname for f in self.fields]
        self._converters: list[tuple[int, Callable[..., Any], models.Field]] | None = None
        self._connection: Any = None

    def __len__(self) -> int:
        return len(self.fields)

    def select(self, alias: str) -> str:
        """``alias."col", …`` in field order: the part of a SELECT that ``load`` reads."""
        return ", ".join(f'{alias}."{field.column}"' for field in self.fields)

    def load(self, values: Sequence[Any]) -> M:
        """An instance of the model from exactly ``len(self)`` values, in ``select`` order."""
        if self._converters is None:
            # The connection is only an argument of the converters (the backend's vendor and
            # operations); looking it up per call is a context-local lookup on the hot path.
            self._connection = connections[DEFAULT_DB_ALIAS]
            self._converters = [
                (index, converter, field)
                for index, field in enumerate(self.fields)
                for converter in field.get_db_converters(self._connection)
            ]
        row = list(values)
        for index, converter, field in self._converters:
            row[index] = converter(row[index], field, self._connection)
        return self.model.from_db(DEFAULT_DB_ALIAS, self.attnames, row)


@functools.cache
def columns(model: type[M], exclude: tuple[str, ...] = ()) -> Columns[M]:
    """The (cached) ``Columns`` of ``model`` without the fields named in ``exclude``."""
    return Columns(model, exclude)


def load_row(row: Sequence[Any], *groups: Columns) -> list[models.Model]:
    """Split one result row into instances, one per group of columns, in order."""
    instances, start = [], 0
    for group in groups:
        instances.append(group.load(row[start : start + len(group)]))
        start += len(group)
    return instances


def fetch_one(sql: str, params: Sequence[Any], *groups: Columns) -> list[models.Model] | None:
    """Run ``sql`` (which selects ``groups``' columns in order) and load its one row, or None."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else load_row(row, *groups)


def insert(instance: models.Model) -> tuple[str, list[Any]]:
    """The ``INSERT`` Django's ``save()`` would run for a new ``instance``, and its parameters.

    The statement is compiled once per model (the ORM's own ``InsertQuery``); each call only
    prepares the values, the way the ORM does (``pre_save`` applies defaults such as
    ``auto_now``, ``get_db_prep_save`` adapts them: JSON, datetimes). Plain values only — no
    expressions — and no field with a custom placeholder (``BinaryField``): checked once.
    An auto-increment primary key is left to the database (the instance keeps ``pk=None``).
    """
    connection = connections[DEFAULT_DB_ALIAS]
    sql, fields = _insert_statement(type(instance), instance.pk is None)
    params = [f.get_db_prep_save(f.pre_save(instance, add=True), connection) for f in fields]
    return sql, params


@functools.cache
def _insert_statement(model: type[models.Model], pk_unset: bool) -> tuple[str, tuple]:
    meta = model._meta
    fields = tuple(f for f in meta.local_concrete_fields if not (f is meta.auto_field and pk_unset))
    if any(hasattr(f, "get_placeholder") for f in fields):
        raise TypeError(f"{model.__name__}: a field needs a custom placeholder; use save()")
    query = InsertQuery(model)
    query.insert_values(fields, [model()])
    [(sql, _)] = query.get_compiler(DEFAULT_DB_ALIAS).as_sql()
    return sql, fields

"""The one query layer every reader (CLI, HTTP API, web page, Python API) shares.

A :class:`Store` reads the history store (format 2: ``docs/store.md``, ``sql/store.sql``) of
one schema over one psycopg 3 connection.

* A mutation's *version* is its transaction's position (end LSN) when it is part of the
  committed state, ``None`` for a rolled-back attempt. Mutations are ordered by
  ``(position, ordinal)``.
* Tables are known by identity, named as PostgreSQL names them (``users``, ``"User"``,
  ``"a.b".c``): the current name reads a table's whole history, an old name the versions before
  the rename (:mod:`cdc.query.catalog`).
* Row R of table T at version V: the latest committed change at or before V of R's key (or
  moving a row away from it, or truncating T) decides; one index seek per partition on each of
  ``changes_row``, ``changes_old_row``, ``changes_truncate`` (:mod:`cdc.query.changes`).
  Tables without a key are multisets.
* Before images and changed columns are derived on read; a request's record from its
  transactions, context changes and reported errors (:mod:`cdc.query.requests`).
* A table at a version comes in key order (:mod:`cdc.query.tables`).

Keys: a one-column key is given as a Python scalar, a composite one as a dict
(``{"a": 1, "b": "x"}``), typed with the table's schema (ints for integer types, bools for
bool, text otherwise: give numerics, uuids and timestamps as the server prints them).
"""

from cdc.query.base import DEFAULT_SCHEMA
from cdc.query.model import (
    BlameEntry,
    Key,
    Mutation,
    MutationPage,
    RequestError,
    RequestRecord,
    Row,
    TableInfo,
    TablePage,
    TransactionInfo,
    VersionRange,
    format_key,
    key_from_text,
    table_name,
)
from cdc.query.store import Store
from cdc.store.format import OPS, STATUSES

__all__ = [
    "DEFAULT_SCHEMA",
    "OPS",
    "STATUSES",
    "BlameEntry",
    "Key",
    "Mutation",
    "MutationPage",
    "RequestError",
    "RequestRecord",
    "Row",
    "Store",
    "TableInfo",
    "TablePage",
    "TransactionInfo",
    "VersionRange",
    "format_key",
    "key_from_text",
    "table_name",
]

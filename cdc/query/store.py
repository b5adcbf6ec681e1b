"""The one query layer every reader (CLI, HTTP API, web page, Python API) shares."""

from __future__ import annotations

from cdc.query.search import Search

__all__ = ["Store"]


class Store(Search):
    """Reads of the history store (format 2, docs/store.md) in schema ``schema``.

    Over ``dsn`` (a connection opened lazily on first use, reopened after it breaks) or an open
    ``connection``. Synchronous and not thread-safe: use one ``Store`` per thread (or request).

    Every error is a :class:`~cdc.errors.CdcError`: the store unreachable or not set up →
    :class:`~cdc.errors.StoreUnavailableError`; unknown table, row or request →
    :class:`~cdc.errors.NotFoundError`; a malformed argument → :class:`~cdc.errors.UsageError`.
    """

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

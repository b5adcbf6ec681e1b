"""The OpenAPI 3.1 document of the HTTP API (``/openapi.json``), built from the same field lists
and bounds the endpoints use."""

from __future__ import annotations

import re
from typing import Any

from cdc.query import OPS, STATUSES
from cdc.query.search import MAX_VALUE_CHARS as MAX_SEARCH_VALUE_CHARS
from cdc.query.search import SCAN_LIMIT, SEARCHED_OPS
from cdc.web.limits import (
    MAX_AFTER_CHARS,
    MAX_CURSOR_CHARS,
    MAX_KEY_CHARS,
    MAX_LIMIT,
    MAX_TABLE_CHARS,
    MAX_TEXT_CHARS,
)
from cdc.web.openapi_schemas import SCHEMAS, ref

__all__ = [
    "CURSOR_PATTERN",
    "RESTORE_PARAMS",
    "REVERT_PARAMS",
    "SEARCH_PARAMS",
    "VERSION_PATTERN",
    "openapi_document",
    "query_names",
]


def _param(
    name: str,
    where: str,
    schema: dict[str, Any],
    description: str,
    example: Any = None,
    *,
    required: bool = False,
) -> dict[str, Any]:
    param: dict[str, Any] = {
        "name": name,
        "in": where,
        "required": where == "path" or required,
        "schema": schema,
        "description": description,
    }
    if example is not None:
        param["example"] = example
    return param


def _text(
    max_length: int = MAX_TEXT_CHARS, min_length: int = 0, pattern: str | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length, "maxLength": max_length}
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


VERSION_PATTERN = "^(?:[0-9]{1,19}|[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})?$"
CURSOR_PATTERN = "^(?:[0-9]{1,18}-[0-9]{1,9})?$"
_TIME_TEXT = (
    "ISO 8601 (`2026-03-10`, `2026-03-10T14:00:00Z`; without an offset: UTC), `now`, "
    "or a duration ago (`30m`, `24h`, `7d`)"
)

_P_TABLE = _param(
    "table",
    "path",
    _text(MAX_TABLE_CHARS, 1),
    '`name` (schema public) or `schema.name`; double-quote other identifiers (`"My Table"`, URL-encoded)',
    "users",
)
_P_KEY = _param(
    "key",
    "path",
    _text(MAX_KEY_CHARS, 1),
    'The row\'s key: a scalar (`42`, `abc`) or a JSON object for a composite key (`{"a":1,"b":"x"}`), '
    "URL-encoded",
    "42",
)
_P_VERSION = _param(
    "version",
    "query",
    _text(64, 0, VERSION_PATTERN),
    "A version: an integer LSN or `X/Y` (default: the current version)",
    "1/300",
)
_P_AT = _param("at", "query", _text(64), f"Read at this time instead: {_TIME_TEXT}")
_P_SINCE = _param("since", "query", _text(64), f"Committed at or after: {_TIME_TEXT}")
_P_UNTIL = _param("until", "query", _text(64), f"Committed before (a date alone: its end): {_TIME_TEXT}")
_P_LIMIT = _param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "Page size (default 100)"
)
_P_CURSOR = _param(
    "cursor", "query", _text(MAX_CURSOR_CHARS, 0, CURSOR_PATTERN), "The `next` value of the previous page"
)

_P_REQUEST = _param(
    "request_id",
    "path",
    _text(MAX_TEXT_CHARS, 1),
    "A request id or a unique prefix of one (an ambiguous prefix is a 400 listing the ids it matches)",
    "550e8400",
)

# The parameters of the search and the undo previews, declared once: the handlers accept the query
# parameters listed here (query_names) and nothing else.
SEARCH_PARAMS: list[dict[str, Any]] = [
    _P_TABLE,
    _param("column", "query", _text(MAX_TEXT_CHARS, 1), "The column to search", "plan", required=True),
    _param(
        "value",
        "query",
        _text(MAX_SEARCH_VALUE_CHARS),
        "Its value as text: an integer's digits, `true`/`false`, any other value as the server prints it "
        "(a hashed column: the clear value, searched by its keyed digest)",
        "pro",
        required=True,
    ),
    _P_SINCE,
    _P_UNTIL,
    _param("status", "query", {"type": "string", "enum": ["", *STATUSES]}, "Only this outcome"),
    _param("op", "query", {"type": "string", "enum": ["", *SEARCHED_OPS]}, "Only this operation"),
    _P_CURSOR,
    _P_LIMIT,
    _param(
        "scan",
        "query",
        {"type": "integer", "minimum": 1, "maximum": SCAN_LIMIT},
        f"The most changes of the table to examine (default and maximum {SCAN_LIMIT})",
    ),
]
RESTORE_PARAMS: list[dict[str, Any]] = [
    _P_TABLE,
    _P_KEY,
    {**_P_VERSION, "description": "The version to restore the row to: an integer LSN or `X/Y`"},
    {**_P_AT, "description": f"Or the version at this time: {_TIME_TEXT}"},
]
REVERT_PARAMS: list[dict[str, Any]] = [_P_REQUEST]


def query_names(params: list[dict[str, Any]]) -> tuple[str, ...]:
    """The query parameters of an operation (what its handler accepts)."""
    return tuple(p["name"] for p in params if p["in"] == "query")


_ERROR_TEXTS = {
    400: "Bad argument",
    401: "Missing or invalid token",
    404: "Unknown table, row, request or path",
    409: "Version ahead of the history store (capture has not caught up yet: retry)",
    503: "History store unreachable or not set up",
}
_PREVIEW_503 = (
    "History store or source unreachable, or no source configured (`no_source`: cdc serve was started "
    "without --source)"
)


def _responses(
    schema: str, description: str, *statuses: int, texts: dict[int, str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "200": {"description": description, "content": {"application/json": {"schema": ref(schema)}}}
    }
    for status in statuses:
        out[str(status)] = {
            "description": (texts or {}).get(status, _ERROR_TEXTS[status]),
            "content": {"application/json": {"schema": ref("Error")}},
        }
    return out


def _get(
    summary: str,
    params: list[Any],
    responses: dict[str, Any],
    *,
    open_: bool = False,
    tag: str = "History",
    description: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": re.sub(r"[^a-z0-9]+", "_", summary.lower()).strip("_"),
        "tags": [tag],
        "parameters": params,
        "responses": responses,
    }
    if description is not None:
        operation["description"] = description
    if open_:
        operation["security"] = []
    return {"get": operation}


def _health(ok: str, not_ok: str) -> dict[str, Any]:
    content = {"application/json": {"schema": ref("Health")}}
    return {
        "200": {"description": ok, "content": content},
        "503": {"description": not_ok, "content": content},
    }


def openapi_document(*, secured: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API (every endpoint, parameter and response)."""
    auth = (401,) if secured else ()  # optional query parameters: empty means absent (HTML forms)
    plain = (400, *auth, 503)
    errors = (400, *auth, 404, 503)
    versioned = (400, *auth, 404, 409, 503)
    paths: dict[str, Any] = {
        "/api/v1/tables": _get(
            "List captured tables", [], _responses("TableList", "Captured tables", *plain)
        ),
        "/api/v1/versions": _get(
            "Versions",
            [_param("at", "query", _text(64), f"Also resolve the version at: {_TIME_TEXT}")],
            _responses("Versions", "The readable range of versions", *plain),
        ),
        "/api/v1/tables/{table}/rows": _get(
            "Table at a version",
            [
                _P_TABLE,
                _P_VERSION,
                _P_AT,
                _param("after", "query", _text(MAX_AFTER_CHARS), "The `next` value of the previous page"),
                _P_LIMIT,
            ],
            _responses("TablePage", "One page of the table's rows in key order", *versioned),
        ),
        "/api/v1/tables/{table}/rows/{key}": _get(
            "Row at a version",
            [_P_TABLE, _P_KEY, _P_VERSION, _P_AT],
            _responses("RowAt", "The row (null when absent at that version)", *versioned),
        ),
        "/api/v1/tables/{table}/rows/{key}/history": _get(
            "Row history",
            [
                _P_TABLE,
                _P_KEY,
                _P_SINCE,
                _P_UNTIL,
                _param("committed_only", "query", {"type": "boolean"}, "Leave out rolled-back attempts"),
            ],
            _responses("RowHistory", "The row's mutations, oldest first", *errors),
        ),
        "/api/v1/tables/{table}/rows/{key}/blame": _get(
            "Row blame",
            [_P_TABLE, _P_KEY],
            _responses("Blame", "For each column: the last committed write to it", *errors),
        ),
        "/api/v1/mutations": _get(
            "Mutation log",
            [
                _param(
                    "table",
                    "query",
                    _text(MAX_TABLE_CHARS),
                    "Only this table",
                    "users",
                ),
                _param("key", "query", _text(MAX_KEY_CHARS), "Only this row (needs `table`)", "42"),
                _param("request", "query", _text(), "Only this request (id or unique prefix)"),
                _param("actor", "query", _text(), "Only mutations whose context's actor is this"),
                _P_SINCE,
                _P_UNTIL,
                _param("status", "query", {"type": "string", "enum": ["", *STATUSES]}, "Only this outcome"),
                _param("op", "query", {"type": "string", "enum": ["", *OPS]}, "Only this operation"),
                _P_CURSOR,
                _P_LIMIT,
            ],
            _responses("MutationPage", "Mutations, newest first", *errors),
        ),
        "/api/v1/requests/{request_id}": _get(
            "Request",
            [
                _P_REQUEST,
                _param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    "Mutations to include (default 1000)",
                ),
                _P_CURSOR,
            ],
            _responses("Request", "The request's context, outcome, error and data changes", *errors),
        ),
        "/api/v1/tables/{table}/search": _get(
            "Search by value",
            SEARCH_PARAMS,
            _responses("ValueSearch", "Matching mutations, newest first, and how far the scan went", *errors),
            tag="Search",
            description=(
                "The mutations of the table whose row after the change (INSERT, UPDATE, SNAPSHOT) had "
                "`column` = `value`. A bounded scan, not an index lookup: at most `scan` changes of the "
                "table (newest first, within `since`/`until`) are examined per call; `complete` says "
                "whether the whole window was, `next` continues. A masked or excluded column is refused "
                "(400); a hashed one is searched by the keyed digest of the value when the server has "
                "`policies.hash_key`, else refused."
            ),
        ),
        "/api/v1/requests/{request_id}/revert": _get(
            "Revert preview",
            REVERT_PARAMS,
            _responses(
                "UndoPreview",
                "The SQL `cdc revert` would run, its conflicts and notes (nothing is applied)",
                *errors,
                texts={503: _PREVIEW_503},
            ),
            tag="Undo previews",
            description=(
                "The plan of `cdc revert REQUEST`, built from the history and the source's current rows "
                "(read only). Applying it stays a command: `apply_command`. A plan that would write a "
                "redacted column's placeholder is refused (`refusal`); `sql` is then the "
                "`--keep-redacted` plan, which leaves those columns as they are."
            ),
        ),
        "/api/v1/tables/{table}/rows/{key}/restore": _get(
            "Restore preview",
            RESTORE_PARAMS,
            _responses(
                "UndoPreview",
                "The SQL `cdc restore` would run and the diff now vs the version (nothing is applied)",
                *versioned,
                texts={503: _PREVIEW_503},
            ),
            tag="Undo previews",
            description=(
                "The plan of `cdc restore TABLE --id KEY --version V` (give `version` or `at`). The diff "
                "never shows a value of a redacted column (`redacted`), from the history or the source."
            ),
        ),
        "/healthz": _get("Liveness", [], _health("Healthy", "Unhealthy"), open_=True, tag="Operations"),
        "/readyz": _get("Readiness", [], _health("Ready", "Not ready"), open_=True, tag="Operations"),
        "/metrics": _get(
            "Prometheus metrics",
            [],
            {
                "200": {
                    "description": "Metrics in the Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            open_=True,
            tag="Operations",
        ),
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "cdc history API",
            "version": "1",
            "description": (
                "Row history of a PostgreSQL database captured by cdc: what changed a row, when, and "
                "which request did it. Times are UTC; values are the server's text output (integers "
                "and booleans as JSON). /healthz, /readyz and /metrics need no token."
            ),
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearerAuth": []}]
    return document

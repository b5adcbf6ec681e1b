"""The OpenAPI 3.1 document of the HTTP API (``/openapi.json``), built from the same field lists
and bounds the endpoints use."""

from __future__ import annotations

import re
from typing import Any

from cdc.query import OPS, STATUSES
from cdc.render import MUTATION_CSV_FIELDS
from cdc.web.limits import (
    MAX_AFTER_CHARS,
    MAX_CURSOR_CHARS,
    MAX_KEY_CHARS,
    MAX_LIMIT,
    MAX_TABLE_CHARS,
    MAX_TEXT_CHARS,
)

__all__ = ["CURSOR_PATTERN", "VERSION_PATTERN", "openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_TIME = {"type": "string", "format": "date-time"}
_OBJECT = {"type": "object"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": [
                            "bad_request",
                            "not_found",
                            "unauthorized",
                            "store_unavailable",
                            "internal",
                            "method_not_allowed",
                            "version_ahead",
                            "http_error",
                        ],
                    },
                    "message": _STRING,
                    "hint": _STRING,
                    "id": _STRING,
                    "matches": {
                        "type": "array",
                        "items": _STRING,
                        "description": "An ambiguous request id prefix (400): the ids it matches (at most 10)",
                    },
                    "more_matches": {"type": "boolean", "description": "more ids than `matches` match"},
                },
            }
        },
    },
    "Row": {
        "type": "object",
        "description": "A row image: column → value (the server's text output; "
        "integers and booleans as JSON). Absent columns did not exist at that version.",
    },
    "Mutation": {
        "type": "object",
        "required": list(MUTATION_CSV_FIELDS),  # the fields of mutation_record, as in the CSV export
        "properties": {
            "version": {**_nullable(_INT), "description": "End LSN of the transaction; null: rolled back"},
            "version_lsn": _nullable(_STRING),
            "lsn": _INT,
            "lsn_text": _STRING,
            "xid": _INT,
            "committed_at": _TIME,
            "table": _STRING,
            "key": _nullable(_OBJECT),
            "op": {"type": "string", "enum": list(OPS)},
            "before": _nullable(_OBJECT),
            "after": _nullable(_OBJECT),
            "changed": {"type": "array", "items": _STRING},
            "request_id": _nullable(_STRING),
            "context": _nullable(_OBJECT),
            "status": {"type": "string", "enum": list(STATUSES)},
        },
    },
    "Table": {
        "type": "object",
        "required": ["name", "key_columns", "columns", "keyless", "dropped", "former_names"],
        "properties": {
            "name": {**_STRING, "description": 'schema.name, quoted as PostgreSQL needs (public."User")'},
            "key_columns": {"type": "array", "items": _STRING},
            "columns": {"type": "array", "items": _STRING},
            "keyless": {"type": "boolean"},
            "dropped": {"type": "boolean", "description": "dropped on the source; its history stays"},
            "former_names": {"type": "array", "items": _STRING, "description": "oldest first"},
        },
    },
    "TableList": {
        "type": "object",
        "required": ["tables"],
        "properties": {"tables": {"type": "array", "items": _ref("Table")}},
    },
    "Versions": {
        "type": "object",
        "required": [
            "earliest",
            "earliest_lsn",
            "earliest_at",
            "current",
            "current_lsn",
            "current_at",
            "floor",
            "floor_lsn",
        ],
        "properties": {
            "earliest": _nullable(_INT),
            "earliest_lsn": _nullable(_STRING),
            "earliest_at": _nullable(_TIME),
            "current": _nullable(_INT),
            "current_lsn": _nullable(_STRING),
            "current_at": _nullable(_TIME),
            "floor": _nullable(_INT),
            "floor_lsn": _nullable(_STRING),
            "at": _TIME,
            "version_at": _nullable(_INT),
            "version_at_lsn": _nullable(_STRING),
        },
    },
    "RowAt": {
        "type": "object",
        "required": ["table", "key", "version", "version_lsn", "exact", "row"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "version": _nullable(_INT),
            "version_lsn": _nullable(_STRING),
            "exact": {"type": "boolean", "description": "false below the history floor: nothing is read"},
            "row": _nullable(_OBJECT),
        },
    },
    "TablePage": {
        "type": "object",
        "required": ["table", "version", "version_lsn", "exact", "rows", "next"],
        "properties": {
            "table": _STRING,
            "version": _nullable(_INT),
            "version_lsn": _nullable(_STRING),
            "exact": {"type": "boolean"},
            "rows": {"type": "array", "items": _ref("Row")},
            "next": {**_nullable(_STRING), "description": "pass as `after` for the next page"},
        },
    },
    "RowHistory": {
        "type": "object",
        "required": ["table", "key", "mutations"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "mutations": {"type": "array", "items": _ref("Mutation")},
        },
    },
    "BlameEntry": {
        "type": "object",
        "required": [
            "column",
            "value",
            "request_id",
            "committed_at",
            "version",
            "op",
            "rolled_back",
            "rolled_back_request_id",
            "rolled_back_at",
        ],
        "properties": {
            "column": _STRING,
            "value": {},
            "request_id": _nullable(_STRING),
            "committed_at": _nullable(_TIME),
            "version": _nullable(_INT),
            "op": _nullable(_STRING),
            "rolled_back": {"type": "boolean"},
            "rolled_back_request_id": _nullable(_STRING),
            "rolled_back_at": _nullable(_TIME),
        },
    },
    "Blame": {
        "type": "object",
        "required": ["table", "key", "columns"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "columns": {"type": "array", "items": _ref("BlameEntry")},
        },
    },
    "MutationPage": {
        "type": "object",
        "required": ["mutations", "next"],
        "properties": {
            "mutations": {"type": "array", "items": _ref("Mutation")},
            "next": {**_nullable(_STRING), "description": "pass as `cursor` for the next (older) page"},
        },
    },
    "Transaction": {
        "type": "object",
        "required": [
            "position",
            "position_lsn",
            "xid",
            "version",
            "commit_lsn",
            "status",
            "committed_at",
            "origin",
            "mutation_count",
            "possibly_incomplete",
        ],
        "properties": {
            "position": _INT,
            "position_lsn": _STRING,
            "xid": _INT,
            "version": _nullable(_INT),
            "commit_lsn": _nullable(_INT),
            "status": {"type": "string", "enum": list(STATUSES)},
            "committed_at": _TIME,
            "origin": _nullable(_STRING),
            "mutation_count": _INT,
            "possibly_incomplete": {
                "type": "boolean",
                "description": "rolled back and not decoded in progress: attempted changes may be missing",
            },
        },
    },
    "RequestError": {
        "type": "object",
        "required": ["type", "message", "location", "at", "attributed", "attribution", "reported_by"],
        "properties": {
            "type": _nullable(_STRING),
            "message": _nullable(_STRING),
            "location": _nullable(_STRING),
            "at": _nullable(_TIME),
            "attributed": {
                "type": "boolean",
                "description": "true: reported by a session that wrote this request's context (same db_user "
                "and backend_pid as a verified context, or proven by its session token): the root cause; "
                "false: reported by another session (or before messages were signed)",
            },
            "attribution": {
                "type": "string",
                "enum": ["own_session", "no_captured_session", "other_session", "unverified"],
            },
            "reported_by": {
                "type": "object",
                "description": "the reporting session, as the source stamped it",
                "required": ["db_user", "backend_pid", "client_addr", "xid", "proven"],
                "properties": {
                    "db_user": _nullable(_STRING),
                    "backend_pid": _nullable(_INT),
                    "client_addr": _nullable(_STRING),
                    "xid": _nullable(_INT),
                    "proven": {"type": "boolean"},
                },
            },
        },
    },
    "Request": {
        "type": "object",
        "required": [
            "request_id",
            "actor",
            "outcome",
            "context",
            "trace_id",
            "span_id",
            "traces",
            "first_seen_at",
            "last_seen_at",
            "committed_count",
            "rolled_back_count",
            "error",
            "errors",
            "possibly_incomplete",
            "transactions",
            "mutation_count",
            "mutations",
            "next",
        ],
        "properties": {
            "request_id": _STRING,
            "actor": _nullable(_STRING),
            "outcome": {
                "type": "string",
                "enum": ["committed", "rolled_back", "partly_rolled_back", "unknown"],
            },
            "context": _nullable(_OBJECT),
            "trace_id": {
                **_nullable(_STRING),
                "description": "W3C trace id (32 hex digits) of the request's first traced context: "
                "the traceparent given to the client helper or the middleware; null without one",
            },
            "span_id": {
                **_nullable(_STRING),
                "description": "the span id (16 hex digits) that came with trace_id: the traceparent's "
                "parent-id, the span that made the request",
            },
            "traces": {
                "type": "array",
                "description": "every (trace id, span id) pair of the request's contexts, first seen first",
                "items": {
                    "type": "object",
                    "required": ["trace_id", "span_id"],
                    "properties": {"trace_id": _STRING, "span_id": _nullable(_STRING)},
                },
            },
            "first_seen_at": _nullable(_TIME),
            "last_seen_at": _nullable(_TIME),
            "committed_count": _INT,
            "rolled_back_count": _INT,
            "error": {
                **_nullable(_ref("RequestError")),
                "description": "the error to show: the root cause (an attributed error), else the last "
                "error reported for the request (not attributed: never its root cause)",
            },
            "errors": {
                "type": "array",
                "description": "every error the request reported; only an attributed one is its root cause",
                "items": _ref("RequestError"),
            },
            "possibly_incomplete": {"type": "boolean"},
            "transactions": {"type": "array", "items": _ref("Transaction")},
            "mutation_count": _INT,
            "mutations": {"type": "array", "items": _ref("Mutation")},
            "next": {
                **_nullable(_STRING),
                "description": "pass as `cursor` for the request's next mutations",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "ok"],
        "properties": {"status": _STRING, "ok": {"type": "boolean"}},
    },
}


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, example: Any = None
) -> dict[str, Any]:
    param: dict[str, Any] = {
        "name": name,
        "in": where,
        "required": where == "path",
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

_ERROR_TEXTS = {
    400: "Bad argument",
    401: "Missing or invalid token",
    404: "Unknown table, row, request or path",
    409: "Version ahead of the history store (capture has not caught up yet: retry)",
    503: "History store unreachable or not set up",
}


def _responses(schema: str, description: str, *statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "200": {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    }
    for status in statuses:
        out[str(status)] = {
            "description": _ERROR_TEXTS[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return out


def _get(
    summary: str, params: list[Any], responses: dict[str, Any], *, open_: bool = False
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": re.sub(r"[^a-z0-9]+", "_", summary.lower()).strip("_"),
        "parameters": params,
        "responses": responses,
    }
    if open_:
        operation["security"] = []
    return {"get": operation}


def _health(ok: str, not_ok: str) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref("Health")}}
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
                _param(
                    "request_id",
                    "path",
                    _text(MAX_TEXT_CHARS, 1),
                    "A request id or a unique prefix of one (an ambiguous prefix is a 400 listing the ids it matches)",
                    "550e8400",
                ),
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
        "/healthz": _get("Liveness", [], _health("Healthy", "Unhealthy"), open_=True),
        "/readyz": _get("Readiness", [], _health("Ready", "Not ready"), open_=True),
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
        "components": {"schemas": _SCHEMAS},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearerAuth": []}]
    return document

"""The component schemas of the OpenAPI document (cdc/web/openapi.py): what the API answers."""

from __future__ import annotations

from typing import Any

from cdc.query import OPS, STATUSES
from cdc.render import MUTATION_CSV_FIELDS
from cdc.store.format import MAYBE_INCOMPLETE_NOTE

__all__ = ["SCHEMAS", "nullable", "ref"]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_TIME = {"type": "string", "format": "date-time"}
_OBJECT = {"type": "object"}

SCHEMAS: dict[str, Any] = {
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
                            "no_source",
                            "source_unavailable",
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
            "version": {**nullable(_INT), "description": "End LSN of the transaction; null: rolled back"},
            "version_lsn": nullable(_STRING),
            "lsn": _INT,
            "lsn_text": _STRING,
            "xid": _INT,
            "committed_at": _TIME,
            "table": _STRING,
            "key": nullable(_OBJECT),
            "op": {"type": "string", "enum": list(OPS)},
            "before": nullable(_OBJECT),
            "after": nullable(_OBJECT),
            "changed": {"type": "array", "items": _STRING},
            "request_id": nullable(_STRING),
            "context": nullable(_OBJECT),
            "status": {"type": "string", "enum": list(STATUSES)},
            "possibly_incomplete": {
                "type": "boolean",
                "description": f"true: a rolled-back attempt of a transaction capture could not show it saw "
                f"whole ({MAYBE_INCOMPLETE_NOTE})",
            },
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
        "properties": {"tables": {"type": "array", "items": ref("Table")}},
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
            "earliest": nullable(_INT),
            "earliest_lsn": nullable(_STRING),
            "earliest_at": nullable(_TIME),
            "current": nullable(_INT),
            "current_lsn": nullable(_STRING),
            "current_at": nullable(_TIME),
            "floor": nullable(_INT),
            "floor_lsn": nullable(_STRING),
            "at": _TIME,
            "version_at": nullable(_INT),
            "version_at_lsn": nullable(_STRING),
        },
    },
    "RowAt": {
        "type": "object",
        "required": ["table", "key", "version", "version_lsn", "exact", "row"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "version": nullable(_INT),
            "version_lsn": nullable(_STRING),
            "exact": {"type": "boolean", "description": "false below the history floor: nothing is read"},
            "row": nullable(_OBJECT),
        },
    },
    "TablePage": {
        "type": "object",
        "required": ["table", "version", "version_lsn", "exact", "rows", "next"],
        "properties": {
            "table": _STRING,
            "version": nullable(_INT),
            "version_lsn": nullable(_STRING),
            "exact": {"type": "boolean"},
            "rows": {"type": "array", "items": ref("Row")},
            "next": {**nullable(_STRING), "description": "pass as `after` for the next page"},
        },
    },
    "RowHistory": {
        "type": "object",
        "required": ["table", "key", "mutations"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "mutations": {"type": "array", "items": ref("Mutation")},
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
            "request_id": nullable(_STRING),
            "committed_at": nullable(_TIME),
            "version": nullable(_INT),
            "op": nullable(_STRING),
            "rolled_back": {"type": "boolean"},
            "rolled_back_request_id": nullable(_STRING),
            "rolled_back_at": nullable(_TIME),
        },
    },
    "Blame": {
        "type": "object",
        "required": ["table", "key", "columns"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "columns": {"type": "array", "items": ref("BlameEntry")},
        },
    },
    "MutationPage": {
        "type": "object",
        "required": ["mutations", "next"],
        "properties": {
            "mutations": {"type": "array", "items": ref("Mutation")},
            "next": {**nullable(_STRING), "description": "pass as `cursor` for the next (older) page"},
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
            "version": nullable(_INT),
            "commit_lsn": nullable(_INT),
            "status": {"type": "string", "enum": list(STATUSES)},
            "committed_at": _TIME,
            "origin": nullable(_STRING),
            "mutation_count": _INT,
            "possibly_incomplete": {
                "type": "boolean",
                "description": f"rolled back, and capture could not show it saw every change: {MAYBE_INCOMPLETE_NOTE}",
            },
        },
    },
    "RequestError": {
        "type": "object",
        "required": ["type", "message", "location", "at", "attributed", "attribution", "reported_by"],
        "properties": {
            "type": nullable(_STRING),
            "message": nullable(_STRING),
            "location": nullable(_STRING),
            "at": nullable(_TIME),
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
                    "db_user": nullable(_STRING),
                    "backend_pid": nullable(_INT),
                    "client_addr": nullable(_STRING),
                    "xid": nullable(_INT),
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
            "incomplete_note",
            "transactions",
            "mutation_count",
            "mutations",
            "next",
        ],
        "properties": {
            "request_id": _STRING,
            "actor": nullable(_STRING),
            "outcome": {
                "type": "string",
                "enum": ["committed", "rolled_back", "partly_rolled_back", "unknown"],
            },
            "context": nullable(_OBJECT),
            "trace_id": {
                **nullable(_STRING),
                "description": "W3C trace id (32 hex digits) of the request's first traced context: "
                "the traceparent given to the client helper or the middleware; null without one",
            },
            "span_id": {
                **nullable(_STRING),
                "description": "the span id (16 hex digits) that came with trace_id: the traceparent's "
                "parent-id, the span that made the request",
            },
            "traces": {
                "type": "array",
                "description": "every (trace id, span id) pair of the request's contexts, first seen first",
                "items": {
                    "type": "object",
                    "required": ["trace_id", "span_id"],
                    "properties": {"trace_id": _STRING, "span_id": nullable(_STRING)},
                },
            },
            "first_seen_at": nullable(_TIME),
            "last_seen_at": nullable(_TIME),
            "committed_count": _INT,
            "rolled_back_count": _INT,
            "error": {
                **nullable(ref("RequestError")),
                "description": "the error to show: the root cause (an attributed error), else the last "
                "error reported for the request (not attributed: never its root cause)",
            },
            "errors": {
                "type": "array",
                "description": "every error the request reported; only an attributed one is its root cause",
                "items": ref("RequestError"),
            },
            "possibly_incomplete": {
                "type": "boolean",
                "description": "a rolled-back transaction of the request may miss attempted changes",
            },
            "incomplete_note": {
                **nullable(_STRING),
                "description": f'"{MAYBE_INCOMPLETE_NOTE}" when possibly_incomplete, else null',
            },
            "transactions": {"type": "array", "items": ref("Transaction")},
            "mutation_count": _INT,
            "mutations": {"type": "array", "items": ref("Mutation")},
            "next": {
                **nullable(_STRING),
                "description": "pass as `cursor` for the request's next mutations",
            },
        },
    },
    "ValueSearch": {
        "type": "object",
        "required": [
            "table",
            "column",
            "policy",
            "scanned",
            "scan_limit",
            "complete",
            "searched_to",
            "mutations",
            "next",
        ],
        "properties": {
            "table": _STRING,
            "column": _STRING,
            "policy": {
                **nullable(_STRING),
                "description": "`hash`: a hashed column, searched by the keyed digest of the value given",
            },
            "scanned": {**_INT, "description": "changes of the table examined by this call"},
            "scan_limit": {**_INT, "description": "the most changes one call examines"},
            "complete": {
                "type": "boolean",
                "description": "true: every change of the window was examined; false: go on with `next`",
            },
            "searched_to": {**nullable(_TIME), "description": "commit time of the oldest change examined"},
            "mutations": {"type": "array", "items": ref("Mutation")},
            "next": {
                **nullable(_STRING),
                "description": "pass as `cursor` to go on (more matches, or the rest of the window)",
            },
        },
    },
    "Conflict": {
        "type": "object",
        "required": ["table", "key", "column", "request_id", "version", "version_lsn", "reason"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "column": {**nullable(_STRING), "description": "null: the whole row"},
            "request_id": {**nullable(_STRING), "description": "the later request (null: not known)"},
            "version": nullable(_INT),
            "version_lsn": nullable(_STRING),
            "reason": _STRING,
        },
    },
    "DiffEntry": {
        "type": "object",
        "required": ["column", "current", "target", "current_present", "target_present", "redacted"],
        "properties": {
            "column": _STRING,
            "current": {"description": "the value on the source now (null when redacted or absent)"},
            "target": {"description": "the value at the version (null when redacted or absent)"},
            "current_present": {"type": "boolean"},
            "target_present": {"type": "boolean"},
            "redacted": {
                **nullable({"type": "string", "enum": ["hash", "mask", "exclude"]}),
                "description": "the column's policy: neither value is shown",
            },
        },
    },
    "UndoPreview": {
        "type": "object",
        "required": [
            "kind",
            "target",
            "sql",
            "statements",
            "conflicts",
            "notes",
            "diff",
            "refusal",
            "keep_redacted",
            "command",
            "apply_command",
        ],
        "properties": {
            "kind": {"type": "string", "enum": ["revert", "restore"]},
            "target": {**_STRING, "description": "the request id, or `table key @ version`"},
            "sql": {
                **nullable(_STRING),
                "description": "the psql script the command prints (null: nothing to run)",
            },
            "statements": _INT,
            "conflicts": {
                "type": "array",
                "items": ref("Conflict"),
                "description": "later changes the revert would overwrite (applying needs --force)",
            },
            "notes": {"type": "array", "items": _STRING},
            "diff": {"type": "array", "items": ref("DiffEntry"), "description": "restore: now vs target"},
            "refusal": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["message", "hint", "columns"],
                        "properties": {
                            "message": _STRING,
                            "hint": nullable(_STRING),
                            "columns": {
                                **nullable(_OBJECT),
                                "description": "redacted columns: table -> column -> policy",
                            },
                        },
                    },
                    {"type": "null"},
                ],
                "description": "why the plan as asked is refused (then `sql`, if any, is the "
                "--keep-redacted plan)",
            },
            "keep_redacted": {"type": "boolean"},
            "command": {**_STRING, "description": "the cdc command that prints this plan"},
            "apply_command": {
                **nullable(_STRING),
                "description": "the cdc command that applies it (never applied by the server)",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "ok"],
        "properties": {"status": _STRING, "ok": {"type": "boolean"}},
    },
}

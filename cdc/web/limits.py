"""The bounds of the HTTP API's arguments (shared by the endpoints and their OpenAPI document)."""

from __future__ import annotations

MAX_KEY_CHARS = 4096  # a row key in a path or a filter (scalar text or JSON)
MAX_AFTER_CHARS = 16384  # a table page cursor (a whole row for tables without a key)
MAX_TEXT_CHARS = 1024  # table names, request ids, actors, times, versions
MAX_CURSOR_CHARS = 64
MAX_TABLE_CHARS = 300  # two quoted identifiers of 63 bytes with every quote doubled
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

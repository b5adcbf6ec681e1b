"""The canonical text of a row's key (docs/store.md "The key: key_text").

``key_text`` gives the text PostgreSQL's ``jsonb`` output gives for the JSON array of the key
values, ``jsonb_build_array(v1, v2, ...)::text``: elements separated by ``", "``, strings escaped
as ``escape_json`` does. The capture core builds the same text from the tuple bytes; readers
build it from the values a user names. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

JsonValue = Any  # None, bool, int, str, or (an oversize reference) a dict of those


def json_string(s: str) -> str:
    """``s`` as a JSON string, escaped exactly as PostgreSQL's ``escape_json``: ``\\"``, ``\\\\``,
    ``\\b \\f \\n \\r \\t``, other characters below U+0020 as ``\\u00xx``, the rest as it is."""
    # orjson escapes exactly these, with lower-case hex (tested against the server).
    return orjson.dumps(s).decode()


def key_text(values: Sequence[JsonValue]) -> str:
    """The jsonb text of the array of ``values`` (key columns in key order)."""
    return "[" + ", ".join([_jsonb(v) for v in values]) + "]"


def _jsonb(value: JsonValue) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, Mapping):
        # jsonb orders an object's keys by length, then bytewise.
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{json_string(k)}: {_jsonb(value[k])}" for k in keys) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_jsonb(v) for v in value) + "]"
    raise TypeError(
        f"a key value must be None, bool, int, str or an oversize reference, not {type(value).__name__}"
    )

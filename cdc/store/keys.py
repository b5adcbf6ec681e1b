"""The canonical text of row keys and JSON values, as the store keeps them (docs/store.md).

``key_text(values)`` is the text PostgreSQL's ``jsonb`` output gives for the JSON array of the
key column values (``[42]``, ``["a", 1]``: elements separated by ``", "``), the same as
``jsonb_build_array(v1, v2, ...)::text`` in SQL. ``json_string(s)`` is a JSON string escaped
exactly as PostgreSQL's ``escape_json`` does. Values are image values: ``None``, bools, ints,
strings (every other type is its server text as a string) and the ``{"$cdc": ...}`` objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["image_text", "json_string", "json_value", "key_text"]

# escape_json (src/backend/utils/adt/json.c): the five named escapes, other bytes below 0x20
# as \u00xx (lower-case hex), everything else as it is.
_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    ord("\b"): "\\b",
    ord("\f"): "\\f",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def json_string(text: str) -> str:
    """``text`` as a JSON string, escaped as PostgreSQL's ``escape_json`` does."""
    return '"' + text.translate(_ESCAPES) + '"'


def json_value(value: Any, *, spaced: bool = True) -> str:
    """One value as JSON text: jsonb's output form (``spaced``: ``", "``, ``": "``, object keys in
    jsonb's order) or the compact form of images (members in the order given)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, Mapping):
        colon, comma = (": ", ", ") if spaced else (":", ",")
        names = [str(k) for k in value]
        if spaced:  # jsonb keeps an object's keys shortest first, then in byte order
            names.sort(key=lambda k: (len(k.encode()), k.encode()))
        members = (f"{json_string(k)}{colon}{json_value(value[k], spaced=spaced)}" for k in names)
        return "{" + comma.join(members) + "}"
    if isinstance(value, list | tuple):
        comma = ", " if spaced else ","
        return "[" + comma.join(json_value(v, spaced=spaced) for v in value) + "]"
    raise TypeError(f"not a store value: {type(value).__name__}")


def key_text(values: Iterable[Any]) -> str:
    """The canonical key: jsonb's text of the array of the key column values, in key order."""
    return "[" + ", ".join(json_value(v) for v in values) + "]"


def image_text(image: Mapping[str, Any]) -> str:
    """A row image as the store keeps it: a compact JSON object, members in column order."""
    return json_value(image, spaced=False)

"""How column values are kept: the server's text output, typed only where that is lossless.

pgoutput sends every value in the text form the server prints for it. We keep that text
as it is (numeric keeps every digit, bytea stays ``\\x`` hex, timestamps keep their
offset), except for integers and booleans, which become JSON numbers and booleans so
that keys read naturally (``{"id": 42}``). NULL is ``None``; a column the image does
not have is simply absent from the dict. Pure functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

JsonValue = Any
Converter = Callable[[str], JsonValue] | None  # None: keep the text as it is

INTEGER_TYPE_OIDS = frozenset({20, 21, 23, 26, 28})  # int8, int2, int4, oid, xid
BOOL_TYPE_OID = 16


def _to_bool(text: str) -> bool:
    return text == "t"


def converter_for(type_oid: int) -> Converter:
    """The function turning the server's text output of ``type_oid`` into the stored value."""
    if type_oid in INTEGER_TYPE_OIDS:
        return int
    if type_oid == BOOL_TYPE_OID:
        return _to_bool
    return None


def convert(converter: Converter, text: str | None) -> JsonValue:
    if text is None or converter is None:
        return text
    return converter(text)


def key_value_from_user(type_oid: int, value: object) -> JsonValue:
    """Turn a key value given by a user (CLI text, Python scalar) into the stored form."""
    if value is None:
        return None
    if type_oid in INTEGER_TYPE_OIDS:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(str(value).strip())
    if type_oid == BOOL_TYPE_OID:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"t", "true", "1", "yes", "on"}:
            return True
        if text in {"f", "false", "0", "no", "off"}:
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return str(value)

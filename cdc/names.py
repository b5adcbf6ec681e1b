"""Table names as PostgreSQL reads and prints them (docs/store.md "Naming a table").

``parse_table('users')`` → ``("public", "users")``: an unquoted identifier is folded to lower
case (ASCII letters only, as PostgreSQL does in a UTF-8 database), a double-quoted one is kept
exactly (``""`` inside stands for ``"``), ``U&"d\\0061ta"`` takes Unicode escapes, and the
schema defaults to ``public``. ``format_table(schema, name)`` is the inverse: each part quoted
only where PostgreSQL needs it: ``public."User"``, ``"a.b".c``, ``"a.b"."c d"``, ``public.user``
(a keyword needs no quotes after a dot), ``display_table`` the short form (``"user"``).
Pure functions; errors are :class:`~cdc.errors.UsageError`.
"""

from __future__ import annotations

import re

from cdc.errors import UsageError

__all__ = [
    "DEFAULT_SCHEMA",
    "MAX_IDENTIFIER_BYTES",
    "display_table",
    "format_table",
    "parse_identifiers",
    "parse_table",
    "quote_ident",
]

DEFAULT_SCHEMA = "public"
MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1

# The scanner's ident_start / ident_cont: ASCII letters, "_", every non-ASCII character; then
# also digits and "$".
_UNQUOTED = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_SAFE = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)  # quote_ident's "needs no quotes"
_SPACE = " \t\n\r\f\v"
_UESCAPE = re.compile(r"""[\s]*UESCAPE[\s]*'([^'])'""", re.IGNORECASE)

#: The reserved and type/function-name keywords of PostgreSQL 18 (pg_get_keywords(), catcode R
#: or T): a bare table or schema name spelled like one needs quotes (after a dot none does).
KEYWORDS = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case cast check
    collate collation column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user default deferrable desc
    distinct do else end except false fetch for foreign freeze from full grant group having ilike in
    initially inner intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps placing primary
    references returning right select session_user similar some symmetric system_user table
    tablesample then to trailing true union unique user using variadic verbose when where window
    with""".split()  # noqa: SIM905 - the list as pg_get_keywords() prints it
)


def _fold(text: str) -> str:
    """PostgreSQL's downcase_identifier in a multibyte encoding: ASCII A-Z only."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The body of the double-quoted identifier opening at ``text[i]``, and the index after it."""
    chunks: list[str] = []
    j = i + 1
    while True:
        k = text.find('"', j)
        if k < 0:
            raise ValueError("unterminated double quote")
        chunks.append(text[j:k])
        if text.startswith('"', k + 1):
            chunks.append('"')
            j = k + 2
            continue
        return "".join(chunks), k + 1


def _unicode_escapes(body: str, escape: str) -> str:
    """Decode ``U&"..."``: ``\\XXXX``, ``\\+XXXXXX`` and a doubled escape character."""
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char != escape:
            out.append(char)
            i += 1
            continue
        if body.startswith(escape, i + 1):
            out.append(escape)
            i += 2
            continue
        if body.startswith("+", i + 1):
            digits, i = body[i + 2 : i + 8], i + 8
        else:
            digits, i = body[i + 1 : i + 5], i + 5
        if not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) not in (4, 6):
            raise ValueError("invalid Unicode escape (expected \\XXXX or \\+XXXXXX)")
        code = int(digits, 16)
        if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError("invalid Unicode escape value")
        out.append(chr(code))
    return "".join(out)


def _identifier(text: str, i: int) -> tuple[str, int]:
    """One identifier starting at ``text[i]``: its exact name and the index after it."""
    if text.startswith(('U&"', 'u&"'), i):
        body, i = _quoted(text, i + 2)
        escape = "\\"
        found = _UESCAPE.match(text, i)
        if found is not None:
            escape, i = found.group(1), found.end()
            if escape in "+'\"" or escape.isspace() or re.fullmatch(r"[0-9A-Fa-f]", escape):
                raise ValueError("invalid Unicode escape character")
        name = _unicode_escapes(body, escape)
    elif text.startswith('"', i):
        name, i = _quoted(text, i)
    else:
        match = _UNQUOTED.match(text, i)
        if match is None:
            raise ValueError("expected an identifier")
        name, i = _fold(match.group()), match.end()
    if not name:
        raise ValueError("zero-length quoted identifier")
    if "\x00" in name:
        raise ValueError("NUL in an identifier")
    size = len(name.encode())
    if size > MAX_IDENTIFIER_BYTES:
        clipped = name.encode()[:MAX_IDENTIFIER_BYTES].decode(errors="ignore")
        raise ValueError(
            f"identifier of {size} bytes, longer than {MAX_IDENTIFIER_BYTES}: PostgreSQL "
            f"truncates it to {quote_ident(clipped)}"
        )
    return name, i


def parse_identifiers(text: str) -> list[str]:
    """The dot-separated identifiers of ``text`` (whitespace allowed around the dots)."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        name, i = _identifier(text, i)
        parts.append(name)
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            return parts
        if text[i] != ".":
            raise ValueError(f"unexpected character {text[i]!r}")
        i += 1


def parse_table(name: str, *, default_schema: str = DEFAULT_SCHEMA) -> tuple[str, str]:
    """``(schema, table)`` for ``name`` read as PostgreSQL reads a (schema-qualified) table name."""
    try:
        parts = parse_identifiers(name)
        if len(parts) > 2:
            raise ValueError("too many dotted names (expected name or schema.name)")
    except ValueError as exc:
        raise UsageError(
            f"invalid table name {_short(name)} ({exc}): expected name or schema.name; "
            'unquoted names are letters, digits, _ and $; double-quote others ("My Table")'
        ) from None
    if len(parts) == 1:
        return default_schema, parts[0]
    return parts[0], parts[1]


def quote_ident(name: str, *, keywords: bool = True) -> str:
    """``name`` quoted where PostgreSQL needs it: anything but lower-case ASCII letters, digits
    and ``_`` (``$`` too, as ``quote_ident`` does), and with ``keywords`` a reserved keyword."""
    if _SAFE.fullmatch(name) and not (keywords and name in KEYWORDS):
        return name
    return '"' + name.replace('"', '""') + '"'


def format_table(schema: str, name: str) -> str:
    """``schema.name`` with each part quoted only where PostgreSQL needs it; inverse of parse_table."""
    return f"{quote_ident(schema)}.{quote_ident(name, keywords=False)}"


def display_table(schema: str, name: str) -> str:
    """The short form people type: ``format_table`` without ``public.`` (``users``, ``"User"``)."""
    return quote_ident(name) if schema == DEFAULT_SCHEMA else format_table(schema, name)


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")

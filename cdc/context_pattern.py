"""The ``application_name`` pattern: a request id carried in ``application_name``.

The pattern is configured in Python syntax (default
:data:`cdc.context.DEFAULT_APPLICATION_NAME_PATTERN`, ``req:<id>``) and translated by
:func:`pattern_to_postgres` into the PostgreSQL regular expression that the context trigger uses;
:func:`request_id_from_application_name` applies the same pattern in Python. Re-exported by
:mod:`cdc.context`.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any, Final

from cdc.errors import ConfigError

__all__ = [
    "compile_application_name_pattern",
    "pattern_to_postgres",
    "request_id_from_application_name",
    "required_literal",
]


def compile_application_name_pattern(pattern: str) -> re.Pattern[str]:
    """Compile the configured pattern, checking it can be translated for PostgreSQL."""
    pattern_to_postgres(pattern)
    return re.compile(pattern)


def request_id_from_application_name(
    application_name: str | None, pattern: str | re.Pattern[str]
) -> str | None:
    """The request id in ``application_name``, as the trigger computes it (None when no match).

    The id is the group named ``id``, else the first group, else the whole match; an empty
    id is no id.
    """
    if not application_name:
        return None
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    match = compiled.search(application_name)
    if match is None:
        return None
    if "id" in compiled.groupindex:
        found = match.group("id")
    elif compiled.groups:
        found = match.group(1)
    else:
        found = match.group(0)
    return found or None


def required_literal(pattern: str) -> str | None:
    """The longest run of plain characters every match of ``pattern`` must contain, if any.

    The trigger tests it with a cheap ``strpos()`` before running the regular expression (a
    regex evaluation costs several microseconds, and runs on every statement). None for
    case-insensitive patterns and patterns with no mandatory top-level literal.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parser: Any = importlib.import_module("re._parser")  # CPython's own regex parser
            parsed = parser.parse(pattern)
    except Exception:  # noqa: BLE001 - no prefilter is always a correct answer
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    best = ""
    run: list[str] = []
    for op, arg in [*parsed.data, (None, None)]:
        if str(op) == "LITERAL" and isinstance(arg, int):
            run.append(chr(arg))
            continue
        if len(run) > len(best):
            best = "".join(run)
        run = []
    return best or None


_CLASS_ESCAPES: Final = frozenset("dDsSwWntrfv")
_QUANTIFIER_CHARS: Final = frozenset("*+?}")


def pattern_to_postgres(pattern: str) -> str:
    """Translate a Python regular expression to a PostgreSQL (ARE) one for ``substring()``.

    ``substring(text, pattern)`` returns the first capturing group, so the group holding the
    id (named ``id``, else the first group) becomes the only capturing group and every other
    group becomes non-capturing. ``\\b``/``\\B`` become ``\\y``/``\\Y`` (``\\b`` is a
    backspace in PostgreSQL), ``\\xHH`` becomes ``\\u00HH`` and ``{,n}`` becomes ``{0,n}``.
    Constructs with no PostgreSQL equivalent (back references, conditionals, atomic groups,
    possessive quantifiers, flags other than a leading ``(?i)``, POSIX-looking nested sets)
    raise :class:`cdc.errors.ConfigError`. ``application_name`` only ever holds printable
    ASCII (the server replaces anything else with ``?``), which keeps the two engines'
    remaining differences (newlines, Unicode classes) out of play.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "possible nested set": refused below
            compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError([f"application_name pattern {pattern!r}: {exc}"]) from None
    if "id" in compiled.groupindex:
        id_group = compiled.groupindex["id"]
    elif compiled.groups:
        id_group = 1
    else:
        id_group = 0

    def bad(reason: str) -> ConfigError:
        return ConfigError([f"application_name pattern {pattern!r}: {reason} is not supported in PostgreSQL"])

    def escape(i: int, in_class: bool) -> tuple[str, int]:
        nxt = pattern[i + 1]
        if not nxt.isalnum():
            return "\\" + nxt, i + 2
        if nxt in _CLASS_ESCAPES:
            return "\\" + nxt, i + 2
        if nxt in "bB":
            if in_class:
                return ("\\b", i + 2) if nxt == "b" else ("", -1)
            return ("\\y" if nxt == "b" else "\\Y"), i + 2
        if nxt in "AZ" and not in_class:
            return "\\" + nxt, i + 2
        if nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            code = int(pattern[i + 2 : i + 2 + width], 16)  # re.compile checked the digits
            return (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"), i + 2 + width
        return "", -1

    out: list[str] = []
    i, n = 0, len(pattern)
    group_no = 0
    after_quantifier = False
    while i < n:
        ch = pattern[i]
        if after_quantifier and ch == "+":
            raise bad("a possessive quantifier")
        after_quantifier = False
        if ch == "\\":
            text, i_next = escape(i, in_class=False)
            if i_next < 0:
                raise bad(f"the escape \\{pattern[i + 1]}")
            out.append(text)
            i = i_next
        elif ch == "[":
            # A bracket expression, copied up to its closing ]; a ] right after [ or [^ is a literal.
            j = i + 1
            out.append("[")
            if pattern.startswith("^", j):
                out.append("^")
                j += 1
            if pattern.startswith("]", j):
                out.append("]")
                j += 1
            while pattern[j] != "]":
                if pattern[j] == "\\":
                    text, j_next = escape(j, in_class=True)
                    if j_next < 0:
                        raise bad(f"the escape \\{pattern[j + 1]} in a set")
                    out.append(text)
                    j = j_next
                    continue
                if pattern[j] == "[" and pattern[j + 1 : j + 2] in (":", "=", "."):
                    raise bad("a nested set ([: [= [.)")
                out.append(pattern[j])
                j += 1
            out.append("]")
            i = j + 1
        elif ch == "(":
            if not pattern.startswith("(?", i):
                group_no += 1
                out.append("(" if group_no == id_group else "(?:")
                i += 1
                continue
            rest = pattern[i + 2 :]
            if rest.startswith("P<"):
                group_no += 1
                out.append("(" if group_no == id_group else "(?:")
                i = pattern.index(">", i) + 1
            elif rest.startswith(("=", "!", ":")):
                out.append("(?" + rest[0])
                i += 3
            elif rest.startswith(("<=", "<!")):
                out.append("(?" + rest[:2])
                i += 4
            elif rest.startswith("#"):
                i = pattern.index(")", i) + 1
            elif rest.startswith("P="):
                raise bad("a named back reference")
            elif rest.startswith("("):
                raise bad("a conditional group")
            elif rest.startswith(">"):
                raise bad("an atomic group")
            else:
                flags = re.match(r"\(\?([a-zA-Z]+)\)", pattern[i:])
                if flags is not None and i == 0 and flags.group(1) == "i":
                    out.append("(?i)")
                    i += flags.end()
                else:
                    raise bad("inline flags other than a leading (?i)")
        elif ch == "{":
            bound = re.match(r"\{(\d*)(,?)(\d*)\}", pattern[i:])
            if bound is None or (bound.group(1) == "" and bound.group(2) == ""):
                out.append("\\{")  # Python reads a brace that is no bound as a literal
                i += 1
            else:
                low = bound.group(1) or "0"
                out.append("{" + low + bound.group(2) + bound.group(3) + "}")
                i += bound.end()
                after_quantifier = True
        elif ch == "}":
            out.append("\\}")
            i += 1
        else:
            out.append(ch)
            after_quantifier = ch in "*+?"
            if ch in "*+?" and pattern.startswith("?", i + 1):  # lazy quantifier: copy the ?
                out.append("?")
                i += 1
                after_quantifier = True
            i += 1
    return "".join(out)

"""The texts of the configuration that are not names: DSNs (redacted wherever they are shown),
durations (``30s``, ``7d``, ``PT1H``) and sizes (``64MiB``). Re-exported by cdc.config."""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Secret

from cdc.errors import UsageError

__all__ = [
    "MASK",
    "SecretDsn",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
    "redact_dsn",
    "short",
]

_MAX_TEXT = 100  # longer duration/size texts are refused outright
_MASK = "***"
#: How a secret is shown.
MASK = _MASK

# --------------------------------------------------------------------------- redaction

# Free text (an error message quoting a DSN) is redacted by pattern. A value is lexed as libpq
# lexes it (fe-connect.c conninfo_parse): quoted, up to an unescaped quote, or bare, up to
# whitespace; a backslash escapes the next character in both, so "pass\\ word" is one value.
_SECRETS_RE = re.compile(
    r"(?P<uri>[A-Za-z][A-Za-z0-9+.-]*://\S*)"
    r"|(?P<key>[A-Za-z_]*password\s*=\s*)(?:'(?:\\[\s\S]?|[^'\\])*'?|(?:\\[\s\S]?|[^\s\\])*)",
    re.IGNORECASE,
)
_URI_PASSWORD_RE = re.compile(r"([?&][A-Za-z_]*password=)[^&#]*", re.IGNORECASE)
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def _redact_match(match: re.Match[str]) -> str:
    if match.group("key") is not None:
        return match.group("key") + _MASK
    scheme, _, rest = match.group().partition("://")
    at = rest.rfind("@")  # the last "@": an unencoded "@" in the password must not leak its tail
    if at >= 0:
        colon = rest.find(":", 0, at)
        if colon >= 0:
            rest = f"{rest[: colon + 1]}{_MASK}{rest[at:]}"
    return f"{scheme}://{_URI_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, rest)}"


def _redact_text(text: str) -> str:
    return _SECRETS_RE.sub(_redact_match, text)


def _parse_conninfo(text: str) -> dict[str, str] | None:
    """libpq's own reading of ``text`` as a connection string (None: it is not one)."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except (PsycopgError, ValueError, TypeError):
        return None


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` (or any text containing DSNs) with every password replaced by ``***``.

    A connection string is parsed by libpq itself (``psycopg.conninfo.conninfo_to_dict``: every
    form libpq accepts, quotes and backslash escapes, URIs with percent-encoding, passwords in
    URI query parameters, ``sslpassword``). The redaction keeps the text as written when libpq,
    reading the result, finds no password but ``***`` and none of the original secrets is left
    in it; otherwise the DSN is rebuilt from libpq's parameters with the secrets masked. Text
    that is not a connection string (an error message quoting one) is redacted by pattern.
    """
    params = _parse_conninfo(dsn)
    redacted = _redact_text(dsn)
    if not params:
        return redacted
    secrets = [v for k, v in params.items() if k in _SECRET_PARAMS and v]
    reread = _parse_conninfo(redacted)
    if (
        reread is not None
        and all(v == _MASK for k, v in reread.items() if k in _SECRET_PARAMS)
        and not any(len(s) >= 3 and s in redacted for s in secrets)
    ):
        return redacted
    return make_conninfo(**{k: _MASK if k in _SECRET_PARAMS else v for k, v in params.items()})


class SecretDsn(Secret[str]):
    """A DSN whose ``str()``/``repr()`` show it with the password redacted.

    ``get_secret_value()`` returns the DSN to pass to the driver.
    """

    def _display(self) -> str:
        return redact_dsn(self.get_secret_value())


# --------------------------------------------------------------------------- durations and sizes

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION_UNITS_US = {
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_DURATION_PART_RE = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d|w)\s*", re.ASCII | re.IGNORECASE)
_DURATION_RE = re.compile(rf"(?:{_NUMBER}\s*(?:ms|s|m|h|d|w)\s*)+", re.ASCII | re.IGNORECASE)
_PLAIN_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
_ISO_DURATION_RE = re.compile(
    rf"P(?:([0-9]+)W)?(?:([0-9]+)D)?(?:T(?:([0-9]+)H)?(?:([0-9]+)M)?(?:({_NUMBER})S)?)?",
    re.ASCII | re.IGNORECASE,
)
_MAX_TIMEDELTA_US = (timedelta.max.days + 1) * 86_400_000_000 - 1


def short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def parse_duration(text: str) -> timedelta:
    """Parse ``500ms``, ``30s``, ``90m``, ``24h``, ``7d``, ``2w``, ``1h30m``, ``P7D``, ``PT1H30M``
    or a plain number of seconds (``0.2``).

    Raises :class:`UsageError` on anything else, including negative or absurdly large values.
    """
    value = text.strip()
    error = UsageError(
        f"invalid duration {short(text)}: expected seconds (30, 0.5) or a number with a unit: "
        "500ms, 30s, 90m, 24h, 7d, 2w (combinable: 1h30m) or ISO 8601 (P7D, PT1H)"
    )
    if not value or len(value) > _MAX_TEXT:
        raise error
    micros: Fraction
    if _PLAIN_NUMBER_RE.fullmatch(value):
        micros = Fraction(value) * 1_000_000
    elif _DURATION_RE.fullmatch(value):
        micros = sum(
            (
                Fraction(m.group(1)) * _DURATION_UNITS_US[m.group(2).lower()]
                for m in _DURATION_PART_RE.finditer(value)
            ),
            Fraction(0),
        )
    elif (iso := _ISO_DURATION_RE.fullmatch(value)) and value.upper() not in ("P", "PT"):
        if value.upper().endswith("T"):
            raise error
        weeks, days, hours, minutes, seconds = (Fraction(g) if g else Fraction(0) for g in iso.groups())
        micros = (
            weeks * _DURATION_UNITS_US["w"]
            + days * _DURATION_UNITS_US["d"]
            + hours * _DURATION_UNITS_US["h"]
            + minutes * _DURATION_UNITS_US["m"]
            + seconds * _DURATION_UNITS_US["s"]
        )
    else:
        raise error
    rounded = round(micros)
    if rounded > _MAX_TIMEDELTA_US:
        raise UsageError(f"invalid duration {short(text)}: too large")
    return timedelta(microseconds=rounded)


def format_duration(value: timedelta) -> str:
    """Format ``value`` in the largest unit that divides it exactly (``7d``, ``90m``, ``200ms``)."""
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    if micros < 0:
        raise ValueError(f"negative duration {value!r}")
    if micros == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = _DURATION_UNITS_US[unit]
        if micros % size == 0:
            return f"{micros // size}{unit}"
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}".rstrip("0") + "s"


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)", re.ASCII)


def parse_size(text: str) -> int:
    """Parse ``1024`` (bytes), ``512B``, ``64KiB``, ``64MiB``, ``1GiB`` (powers of 1024) or
    ``1kB``, ``64MB``, ``1GB`` (powers of 1000; units are case-insensitive) into bytes.

    Raises :class:`UsageError` on anything else.
    """
    value = text.strip()
    match = _SIZE_RE.fullmatch(value) if len(value) <= _MAX_TEXT else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise UsageError(
            f"invalid size {short(text)}: expected bytes (1024) or a number with a unit: "
            "KiB, MiB, GiB, TiB (1024-based) or kB, MB, GB, TB (1000-based)"
        )
    size = Fraction(match.group(1)) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise UsageError(f"invalid size {short(text)}: not a whole number of bytes")
    return int(size)


def format_size(value: int) -> str:
    """Format a byte count with the largest binary unit that divides it (``64MiB``, ``1000``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)

"""The texts of the configuration that are not names: DSNs (redacted wherever they are shown),
durations (``30s``, ``7d``, ``PT1H``) and sizes (``64MiB``). Re-exported by cdc.config."""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction

from pydantic import Secret

from cdc.errors import UsageError

__all__ = [
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

# --------------------------------------------------------------------------- redaction

_SECRETS_RE = re.compile(
    r"(?P<uri>[A-Za-z][A-Za-z0-9+.-]*://\S*)"
    r"|(?P<key>[A-Za-z_]*password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S*)",
    re.IGNORECASE | re.DOTALL,
)
_URI_PASSWORD_RE = re.compile(r"([?&][A-Za-z_]*password=)[^&#]*", re.IGNORECASE)


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


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` (or any text containing DSNs) with every password replaced by ``***``.

    Handles libpq ``key=value`` strings (``password=...``, quoted or not, also ``sslpassword``)
    and URIs (``postgresql://user:secret@host/db?password=...``).
    """
    return _SECRETS_RE.sub(_redact_match, dsn)


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

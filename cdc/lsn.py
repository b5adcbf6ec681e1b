"""Log sequence numbers: PostgreSQL prints them as ``X/Y``; cdc keeps them as ints."""

from __future__ import annotations

from cdc.errors import UsageError

#: The largest LSN (PostgreSQL's XLogRecPtr is 64 bits: FFFFFFFF/FFFFFFFF).
MAX_LSN = 2**64 - 1


def format_lsn(lsn: int) -> str:
    """Return ``lsn`` the way PostgreSQL prints it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str | int) -> int:
    """Parse ``X/Y`` or a decimal integer into an int LSN."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"invalid LSN {text!r}: must not be negative")
        if text > MAX_LSN:
            raise UsageError(f"invalid LSN {text!r}: larger than any LSN (FFFFFFFF/FFFFFFFF)")
        return text
    value = text.strip()
    try:
        if "/" in value:
            high, low = value.split("/", 1)
            hi, lo = int(high, 16), int(low, 16)
            if not (0 <= hi <= 0xFFFFFFFF and 0 <= lo <= 0xFFFFFFFF):
                raise ValueError(value)
            return (hi << 32) | lo
        number = int(value)
    except ValueError:
        raise UsageError(f"invalid LSN {text!r}: expected X/Y (e.g. 0/16B3748) or an integer") from None
    if number < 0:
        raise UsageError(f"invalid LSN {text!r}: must not be negative")
    if number > MAX_LSN:
        raise UsageError(f"invalid LSN {text!r}: larger than any LSN (FFFFFFFF/FFFFFFFF)")
    return number

"""The one error hierarchy of cdc.

Every error says whether retrying can help (``retryable``): the daemon loop
backs off and retries retryable errors and stops with ``exit_code`` on fatal
ones. Messages are for operators: they say what went wrong and what to run.
They never carry row values.
"""

from __future__ import annotations

from cdc.exit_codes import ExitCode


class CdcError(Exception):
    """Base of every error cdc raises on purpose."""

    retryable: bool = False
    exit_code: int = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(CdcError):
    """The configuration is invalid; ``problems`` lists every wrong key at once."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class MissingSettingError(ConfigError):
    """A setting the command needs (a DSN) is not given: one line naming the ways to give it."""

    def __init__(self, message: str) -> None:
        CdcError.__init__(self, message)
        self.problems = [message]


class UsageError(CdcError):
    """A malformed argument from a user of the CLI, the API or the Python API."""

    exit_code = ExitCode.USAGE


class NotFoundError(UsageError):
    """A table, row or request the user named does not exist in the history."""

    exit_code = ExitCode.NOT_FOUND


class RefusedError(CdcError):
    """An operation refused to protect data (conflicts, a row still live); ``--force`` overrides."""

    exit_code = ExitCode.REFUSED


class AmbiguousRequestError(UsageError):
    """A request id prefix that more than one stored request id starts with: ``matches`` lists
    them (at most ``MAX_MATCHES``; ``more`` tells there are others), so that every reader (CLI,
    API, page) can show them."""

    MAX_MATCHES = 10

    def __init__(self, prefix: str, matches: list[str], *, more: bool = False) -> None:
        self.prefix = prefix
        self.matches = list(matches[: self.MAX_MATCHES])
        self.more = more or len(matches) > self.MAX_MATCHES
        listed = ", ".join(self.matches) + (", ..." if self.more else "")
        super().__init__(
            f"request id prefix {prefix!r} is ambiguous: it matches {listed}",
            hint="give more characters of the id",
        )


class ProtocolError(CdcError):
    """Bytes from the server that do not decode as the protocol says."""

    exit_code = ExitCode.PROTOCOL


class SetupError(CdcError):
    """The source or store is not prepared for capture (wal_level, slot, publication...)."""

    exit_code = ExitCode.SETUP


class SlotLostError(SetupError):
    """The replication slot is missing or invalidated: changes may have been lost."""

    exit_code = ExitCode.SLOT_LOST


class UnavailableError(CdcError):
    """A server cannot be reached or refused a statement; retrying may help."""

    retryable = True
    exit_code = ExitCode.UNAVAILABLE


class SourceUnavailableError(UnavailableError):
    """The source server cannot be reached right now."""


class StoreUnavailableError(UnavailableError):
    """The history store cannot be reached or refused a write; nothing was acknowledged."""


class StandbyError(CdcError):
    """Another daemon holds the slot's lock: this one waits to take over."""

    retryable = True


class IncompleteHistoryError(CdcError):
    """A table's history is incomplete at the version asked: the rows it had when its capture
    began are not (yet) recorded there (its baseline or backfill, docs/baseline.md)."""

    exit_code = 6


class ReadOnlyHistoryView(CdcError):  # noqa: N818 - the name is part of the public contract
    """A write was attempted through a time-travel view."""

    exit_code = ExitCode.USAGE


def error_text(exc: BaseException) -> str:
    """One line describing a (database) error: the server's primary message when the error
    carries one (psycopg's ``diag``), else the first line of its text.

    Never the server's DETAIL or CONTEXT lines: those can quote row values (``COPY mutations,
    line 35: ...``), which must not reach logs or the stored last error."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    text = str(primary or str(exc).strip() or type(exc).__name__)
    return text.splitlines()[0] if text else type(exc).__name__


def reported_message(exc: BaseException) -> str:
    """The text of ``exc`` that may be stored: never a database error's DETAIL, HINT or CONTEXT.

    A server error (psycopg 3, or psycopg2 under SQLAlchemy: anything carrying ``diag``) is
    reported as its primary message and SQLSTATE only: the other fields quote row values
    ("Failing row contains (...)", "Key (email)=(...) already exists"), including the clear
    values of columns the store hashes, masks or excludes. Any other exception is reported as
    the application wrote its message.
    """
    diag = getattr(exc, "diag", None)
    if diag is not None:
        primary = getattr(diag, "message_primary", None)
        sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if not primary:  # no server result (a client-side failure): its first line, no more
            text = str(exc).strip()
            primary = text.splitlines()[0] if text else type(exc).__name__
        return f"{primary} (SQLSTATE {sqlstate})" if sqlstate else str(primary)
    message = str(exc)
    if not message and exc.args:
        message = repr(exc.args[0])
    return message

"""error_text: one line for logs and the stored last error, never the server's CONTEXT."""

from __future__ import annotations

from types import SimpleNamespace

from cdc.errors import error_text


class _DbError(Exception):
    def __init__(self, text: str, primary: str | None) -> None:
        super().__init__(text)
        self.diag = SimpleNamespace(message_primary=primary)


def test_the_servers_primary_message_without_its_context() -> None:
    exc = _DbError(
        'invalid input syntax for type json\nCONTEXT:  COPY mutations, line 35: "secret row value"',
        "invalid input syntax for type json",
    )
    assert error_text(exc) == "invalid input syntax for type json"


def test_without_diag_the_first_line() -> None:
    assert error_text(ValueError("first\nsecond: secret")) == "first"


def test_empty_messages_name_the_type() -> None:
    assert error_text(ValueError("")) == "ValueError"
    assert error_text(_DbError("", None)) == "_DbError"

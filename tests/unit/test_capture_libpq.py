"""The drain path (cdc/capture/libpq.py): the libpq found is the one psycopg calls; anything
else, or anything not matching, takes the psycopg path. No server here
(tests/integration/test_capture_drain.py reads real streams on both paths)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest

from cdc.capture import libpq
from tests.unit.capture_support import IMPLEMENTATIONS, Registry, compiled, module


class NoPtr:
    def get_copy_data(self, async_: int) -> tuple[int, Any]:
        return 0, b""


def test_the_libpq_found_is_the_one_psycopg_loaded() -> None:
    found = libpq.find(psycopg.pq.PGconn)
    assert isinstance(found, libpq.Libpq), found
    assert os.path.basename(found.path).startswith("libpq")
    assert libpq.mapped_file(found.get_copy_data) == found.path == libpq.mapped_file(found.freemem)
    if psycopg.pq.__impl__ == "binary":  # the copy bundled with psycopg[binary], not the system one
        assert "psycopg_binary.libs" in found.path
    assert libpq.find(psycopg.pq.PGconn) is found  # cached


def test_anything_else_takes_the_psycopg_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no pgconn_ptr" in str(libpq.drain_functions(NoPtr()))
    assert libpq.find(NoPtr) == f"unknown psycopg implementation {__name__}"
    monkeypatch.setattr(libpq, "_found", {})
    monkeypatch.setenv("CDC_LIBPQ_DRAIN", "0")
    assert libpq.find(psycopg.pq.PGconn) == "CDC_LIBPQ_DRAIN=0"
    assert libpq.mapped_file(0) is None


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_drain_path_reported(impl: str) -> None:
    core = module(impl).Core(Registry())
    assert core.drain_path is None
    assert core.drain(NoPtr()) == 0
    assert core.drain_path == "psycopg"


def test_both_paths_fail_alike_on_a_connection_without_copy() -> None:
    """A failed connection still has a PGconn: the libpq path's -2 is psycopg's error."""
    compiled_core = compiled()
    errors = []
    for path in ("libpq", "psycopg"):
        pgconn = psycopg.pq.PGconn.connect(b"host=/nonexistent-cdc-test port=1")
        try:
            core = compiled_core.Core(Registry())
            with pytest.raises(psycopg.OperationalError) as raised:
                core.drain(pgconn if path == "libpq" else _Only(pgconn))
            assert core.drain_path == path
            errors.append(str(raised.value))
        finally:
            pgconn.finish()
    assert errors[0] == errors[1]
    assert errors[0].startswith("receiving copy data failed: ")


def test_a_closed_connection_takes_the_psycopg_path() -> None:
    compiled_core = compiled()
    pgconn = psycopg.pq.PGconn.connect(b"host=/nonexistent-cdc-test port=1")
    core = compiled_core.Core(Registry())
    with pytest.raises(psycopg.OperationalError):
        core.drain(pgconn)
    assert core.drain_path == "libpq"
    pgconn.finish()
    with pytest.raises(psycopg.OperationalError):
        core.drain(pgconn)
    assert core.drain_path == "psycopg"


class _Only:
    def __init__(self, pgconn: Any) -> None:
        self.get_copy_data = pgconn.get_copy_data

# Type stub of the compiled capture core (cdc/capture/_core.pyx); the same interface as
# cdc/capture/core.py.
from collections.abc import Callable
from typing import Any

from cdc.capture.libpq import DrainPath
from cdc.capture.model import Event, RelationDesc, RelationInfo

def format_time(us: int) -> str: ...

class Core:
    server_wal_end: int
    last_received_lsn: int
    reply_requested: bool
    @property
    def drain_path(self) -> DrainPath | None: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def spilled_transactions(self) -> int: ...
    @property
    def open_transactions(self) -> int: ...
    def __init__(
        self,
        describe: Callable[[RelationDesc], RelationInfo],
        *,
        skip_through: int = 0,
        memory_limit_bytes: int = 67108864,
        spill_dir: str | None = None,
        max_value_bytes: int = 67108864,
        hash_value: Callable[[bytes], str] | None = None,
    ) -> None: ...
    def relation(self, oid: int) -> RelationInfo | None: ...
    def pop_events(self) -> list[Event]: ...
    def drain(self, pgconn: Any) -> int: ...
    def feed(self, copy_data: bytes) -> None: ...
    def snapshot_lines(
        self,
        info: RelationInfo,
        copy_rows: bytes,
        *,
        position: int,
        first_ordinal: int,
        committed_at_us: int,
    ) -> tuple[bytes, int]: ...

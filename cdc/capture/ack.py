"""The acknowledged LSN, ``acked_lsn``: the one owner of what capture has made durable.

Protocol (docs/store.md, "Positions"): a batch carries an ack LSN (the position of the last
transaction it completes, or a position up to which nothing remains to be written); the store
writer stores it as ``capture_state.acked_lsn`` in the batch's own store transaction, and
replies once that commit returned. Only then does ``acked_lsn`` move here, and only
``acked_lsn`` is reported to the slot (written = flushed = applied), so the slot never passes
what the store holds.

When nothing is in flight (no transaction open in the core, no change waiting to be written),
the slot may move on to the server's WAL end from a keepalive, or to a heartbeat message's
position: an ack-only batch, so that WAL written to other tables is not held back. Such an
advance is asked for at most once per status interval while capture is idle.

Pure bookkeeping: no I/O; the session feeds it and sends what it says.
"""

from __future__ import annotations

import time

from cdc.metrics import Metrics


class Acknowledgement:
    """``acked_lsn`` (stored in the store) and the acks handed to the writer, in order."""

    def __init__(self, acked_lsn: int, *, idle_interval: float) -> None:
        self.acked_lsn = acked_lsn  # committed in the store: what the slot may be told
        self.handed_lsn = acked_lsn  # the highest ack handed to the writer (maybe not yet written)
        self.idle_interval = idle_interval
        self.last_handed = time.monotonic()  # when a batch was last handed to the writer

    def handed(self, ack_lsn: int | None) -> None:
        """A batch went to the writer (with this ack, or none)."""
        self.last_handed = time.monotonic()
        if ack_lsn is not None:
            self.handed_lsn = max(self.handed_lsn, ack_lsn)

    def written(self, ack_lsn: int | None) -> bool:
        """The writer committed a batch with this ack; True when ``acked_lsn`` moved."""
        if ack_lsn is None or ack_lsn <= self.acked_lsn:
            return False
        self.acked_lsn = ack_lsn
        return True

    def idle_advance(
        self, lsn: int, *, quiet: bool, building: int | None, now: float | None = None
    ) -> int | None:
        """Where an idle capture may acknowledge up to: ``lsn`` (a keepalive's WAL end or a
        heartbeat's position) when ``quiet`` (no open transaction, no change waiting), it is
        ahead of every ack handed and of ``building`` (the ack of the batch being built), and
        no batch went to the writer for an idle interval; else None."""
        if not quiet or lsn <= max(self.handed_lsn, building or 0):
            return None
        now = time.monotonic() if now is None else now
        if now - self.last_handed < self.idle_interval:
            return None
        return lsn

    def flush_lsn(self) -> int:
        """What the slot is told is written, flushed and applied."""
        return self.acked_lsn

    def publish(self, metrics: Metrics, server_wal_end: int) -> None:
        """The acknowledgement gauges: confirmed (sent to the slot) and lag in bytes."""
        metrics.confirmed_lsn.set(self.acked_lsn)
        metrics.written_lsn.set(self.acked_lsn)
        if server_wal_end:
            metrics.lag_bytes.set(max(0, server_wal_end - self.acked_lsn))

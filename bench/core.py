"""Micro-benchmark of the capture core: µs of CPU per change, feed + pop_events + chunks.

A synthetic stream in the shape PostgreSQL 16+ sends with
``debug_logical_replication_streaming = immediate``: small request-tagged transactions
(a transactional context message, then 3 inserts/updates of a 5-column table), every change
in its own Stream Start / Stop block, the Relation resent in each transaction, then a Stream
Commit. Run: ``python -m bench.core [--transactions N] [--repeat R]``. Each transaction's
context message is the one the context trigger writes (its fields, signed for its transaction),
with a request id of its own; ``--batches`` also times the daemon's side of each transaction: the
batch builder and the batch's encoding for the writer's pipe.
"""

from __future__ import annotations

import argparse
import importlib
import time

from cdc.capture.batches import CONTEXT_REJECTED, BatchBuilder
from cdc.capture.model import Kind, Policy, RelationDesc, RelationInfo
from cdc.capture.writer_process import encode_batch
from cdc.context import CONTEXT_PREFIX, ContextKeys, ContextVerifier, context_key_id, sign_content
from cdc.protocol import encode as wire

OID = 16_384
KEY = b"bench-context-key".ljust(32, b".")  # the context messages' MAC key (cdc.context)
COLUMNS = [
    (1, "id", 20, -1),
    (0, "account", 23, -1),
    (0, "status", 25, -1),
    (0, "amount", 1700, -1),
    (0, "updated_at", 1184, -1),
]


def describe(desc: RelationDesc) -> RelationInfo:
    return RelationInfo(
        table_id=1,
        schema_id=1,
        names=tuple(c.name for c in desc.columns),
        kinds=tuple(Kind.for_type(c.type_oid) for c in desc.columns),
        policies=tuple(Policy.NONE for _ in desc.columns),
        key=(0,),
        keyless=False,
    )


def stream(transactions: int) -> list[bytes]:
    frames: list[bytes] = []
    lsn = 0x1_0000_0000
    for t in range(transactions):
        xid = 1000 + t
        context = sign_content(
            CONTEXT_PREFIX,
            b'{"request_id":"8f14e45f-ceea-467f-a0e6-%012d","actor":"user:42","application_name":"app",'
            b'"db_user":"app","client_addr":"10.1.2.3","backend_pid":4242,"source":"setting","extra":{},'
            b'"xid":%d}' % (t, xid),
            KEY,
        )
        for c in range(3):
            row = t * 3 + c
            values = [str(row), str(row % 97), "shipped", f"{row % 1000}.25", "2026-12-07 20:39:29.070400+00"]
            body = [wire.stream_start(xid, c == 0)]
            if c == 0:
                body.append(wire.relation(OID, "public", "orders", "d", COLUMNS, xid=xid))
                body.append(wire.message("cdc.context", context, True, lsn, xid=xid))
            if c == 2:
                body.append(wire.update(OID, values, xid=xid))
            else:
                body.append(wire.insert(OID, values, xid=xid))
            body.append(wire.stream_stop())
            for payload in body:
                frames.append(wire.xlog(lsn, payload))
            lsn += 200
        frames.append(wire.xlog(lsn, wire.stream_commit(xid, lsn, lsn + 48, 849_991_169_070_400 + t)))
        lsn += 100
    return frames


def measure(module: str, frames: list[bytes], changes: int, repeat: int, batches: bool = False) -> float:
    core_class = importlib.import_module(module).Core
    best = float("inf")
    for _ in range(repeat):
        core = core_class(describe)
        feed = core.feed
        pop = core.pop_events
        verifier = ContextVerifier(lambda: ContextKeys(KEY, context_key_id(KEY)))
        builder = BatchBuilder(max_rows=5000, actor_last_seq=lambda actor: 0, verifier=verifier)
        started = time.process_time()
        total = 0
        for frame in frames:
            feed(frame)
            for event in pop():
                if batches:
                    for batch in builder.add(event):
                        total += sum(map(len, encode_batch(0, batch.store)))
                    if builder.full:
                        batch = builder.take()
                        assert batch is not None
                        assert not int(batch.store.transactions[0].split(b"\t")[5]) & CONTEXT_REJECTED
                        total += sum(map(len, encode_batch(0, batch.store)))
                else:
                    for chunk in event.chunks(1 << 20):  # type: ignore[union-attr]
                        total += len(chunk)
        elapsed = time.process_time() - started
        assert total > 0
        best = min(best, elapsed)
    return best / changes * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches", action="store_true", help="also the batch builder and encoding")
    args = parser.parse_args(argv)
    frames = stream(args.transactions)
    changes = args.transactions * 3
    print(f"{changes} changes in {len(frames)} frames ({len(frames) / changes:.1f} frames per change)")
    for name, module in (("compiled", "cdc.capture._core"), ("python", "cdc.capture.core")):
        try:
            us = measure(module, frames, changes, args.repeat, args.batches)
        except ImportError:
            print(f"{name:9s} not built")
            continue
        what = (
            "feed + pop_events + BatchBuilder + encode_batch"
            if args.batches
            else "feed + pop_events + chunks"
        )
        print(f"{name:9s} {us:6.2f} µs/change ({what}, best of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

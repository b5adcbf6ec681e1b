# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False, embedsignature=False
"""The capture core, compiled: the same interface, bytes and errors as ``cdc/capture/core.py``.

Frames are parsed with C pointers over their bytes; every read is bounds-checked against the
frame's length first. A change's COPY line middle is written into its transaction's C buffer
as it arrives (no Python object per frame, column or change on this path); Python objects are
made per transaction (the event, its counts, a stream's relation overlay), per Relation body
(its description), and on rare paths (oversize and hashed values, errors, spill files).
``core.py`` is the reference: this file mirrors it check for check, and the tests compare the
two on recorded and fuzzed streams.

One extension module, in parts included as text (so the C compiler sees, and inlines, every
call): ``_core_buffers.pxi`` (C buffers, maps, column arrays), ``_core_pgoutput.pxi``
(reading messages and tuples), ``_core_images.pxi`` (keys, images, values, snapshot rows),
``_core_txn.pxi`` (transaction buffers and spill), ``_core_changes.pxi`` (change lines);
this file holds the state machine (``Core``) and the libpq drain loop.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from cpython.buffer cimport PyBUF_READ, PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8

import tempfile
from dataclasses import replace as dataclass_replace

from cdc.capture import _shared as sh
from cdc.capture import libpq, model
from cdc.capture.pgoutput import parse_relation
from cdc.capture.model import FinishedTransaction, LogicalMessage, RelationDesc, ColumnDesc
from cdc.errors import ProtocolError

cdef object NAMES = sh.NAMES
cdef Py_ssize_t HEADER = sh.RECORD_HEADER
cdef Py_ssize_t SPILL_FLUSH = sh.SPILL_FLUSH_BYTES
cdef Py_ssize_t CACHE_LIMIT = sh.RELATION_CACHE_LIMIT
cdef int64_t MIN_TIME = model.MIN_TIME_US
cdef int64_t MAX_TIME = model.MAX_TIME_US
cdef int64_t MISSED = model.MISSED

cdef enum:
    EXCLUDE = 1
    MASK = 2
    HASH = 3
    ST_NULL = 0
    ST_VALUE = 1
    ST_UNCHANGED = 2
    F_ROLLED_BACK = 1
    F_MAYBE_INCOMPLETE = 2  # a transaction flag (model.MAYBE_INCOMPLETE)
    F_BEFORE = 2
    F_OVERSIZE = 8
    F_KEY_UNKNOWN = 16

# libpq's functions, called through the addresses cdc.capture.libpq finds at run time (no
# libpq header or library at build time).
ctypedef int (*GetCopyData)(void *conn, char **buffer, int async_) noexcept nogil
ctypedef void (*FreeMem)(void *ptr) noexcept nogil

include "_core_buffers.pxi"
include "_core_pgoutput.pxi"
include "_core_images.pxi"
include "_core_txn.pxi"
include "_core_changes.pxi"


# ---------------------------------------------------------------------------------------- the core

cdef class Core:
    """Replication CopyData frames in; finished transactions (as COPY lines) and logical
    messages out. See cdc/capture/model.py and docs/store.md."""

    cdef object _describe
    cdef object _hash_value
    cdef object _spill_dir
    cdef uint64_t _skip_through
    cdef Py_ssize_t _limit
    cdef Py_ssize_t _max_value
    cdef RelMap _relations
    cdef dict _by_body
    cdef dict _streams
    cdef dict _prepared
    cdef _Txn _current
    cdef _Txn _streaming
    cdef _Txn _last_stream
    cdef list _events
    cdef Cols _old
    cdef Cols _new
    cdef Buf _scratch
    cdef public uint64_t server_wal_end
    cdef public uint64_t last_received_lsn
    cdef int64_t _sent  # sendTime of the XLogData frame being read
    cdef public bint reply_requested
    cdef readonly Py_ssize_t memory_bytes
    cdef readonly Py_ssize_t spilled_transactions
    cdef object _drain_conn  # the pgconn the drain path was chosen for, and its pgconn_ptr then
    cdef object _drain_ptr
    cdef void *_conn
    cdef GetCopyData _get_copy_data  # NULL: the psycopg path
    cdef FreeMem _freemem
    cdef readonly object drain_path

    def __cinit__(self):
        self._relations.slots = NULL
        self._relations.cap = 0
        self._relations.count = 0
        self._old.cap = 0
        self._old.state = NULL
        self._old.off = NULL
        self._old.ln = NULL
        self._new.cap = 0
        self._new.state = NULL
        self._new.off = NULL
        self._new.ln = NULL
        self._scratch.data = NULL
        self._scratch.len = 0
        self._scratch.cap = 0
        self._conn = NULL
        self._get_copy_data = NULL
        self._freemem = NULL

    def __init__(
        self,
        describe,
        *,
        skip_through=0,
        memory_limit_bytes=64 << 20,
        spill_dir=None,
        max_value_bytes=64 << 20,
        hash_value=None,
    ):
        self._describe = describe
        self._skip_through = skip_through
        self._limit = memory_limit_bytes
        self._spill_dir = spill_dir
        self._max_value = max_value_bytes
        self._hash_value = hash_value
        self._by_body = {}
        self._streams = {}
        self._prepared = {}
        self._current = None
        self._streaming = None
        self._last_stream = None
        self._events = []
        self.server_wal_end = 0
        self.last_received_lsn = 0
        self._sent = 0
        self.reply_requested = False
        self.memory_bytes = 0
        self.spilled_transactions = 0
        self.drain_path = None

    def __dealloc__(self):
        map_clear(&self._relations)
        cols_free(&self._old)
        cols_free(&self._new)
        buf_free(&self._scratch)

    # -- state ---------------------------------------------------------------------------------
    @property
    def open_transactions(self):
        return len(self._streams) + len(self._prepared) + (1 if self._current is not None else 0)

    def relation(self, oid):
        cdef PyObject *rel
        if not 0 <= oid <= 0xFFFFFFFF:
            return None
        rel = map_get(&self._relations, oid)
        if rel == NULL:
            return None
        return (<_Rel>rel).info

    def pop_events(self):
        events = self._events
        self._events = []
        return events

    # -- input ---------------------------------------------------------------------------------
    def drain(self, pgconn):
        cdef Py_ssize_t count = 0
        if pgconn is not self._drain_conn or getattr(pgconn, "pgconn_ptr", None) != self._drain_ptr:
            self._choose_drain(pgconn)
        if self._get_copy_data != NULL:
            return self._drain_libpq(pgconn)
        get = pgconn.get_copy_data
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                self.feed(data)
                count += 1
            elif nbytes == 0:
                return count
            elif nbytes == -1:
                return -1
            else:
                raise ProtocolError(f"reading the replication stream failed (get_copy_data returned {nbytes})")

    def feed(self, copy_data):
        cdef Py_buffer view
        if PyBytes_CheckExact(copy_data):
            self._frame(<const uint8_t *>PyBytes_AS_STRING(copy_data), PyBytes_GET_SIZE(copy_data))
            return
        PyObject_GetBuffer(copy_data, &view, PyBUF_SIMPLE)
        try:
            self._frame(<const uint8_t *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _frame(self, const uint8_t *data, Py_ssize_t size) except -1:
        cdef uint64_t wal_start, wal_end
        cdef uint8_t reply
        if size == 0:
            raise ProtocolError("empty CopyData frame in the replication stream")
        if data[0] == b'w':
            if size < 25:
                raise ProtocolError(f"malformed XLogData frame: {size} bytes, the header alone is 25")
            wal_start = rd64(data + 1)
            wal_end = rd64(data + 9)
            self._sent = <int64_t>rd64(data + 17)
            if wal_end > self.server_wal_end:
                self.server_wal_end = wal_end
            self.last_received_lsn = wal_start
            return self._message(data + 25, size - 25, wal_start)
        if data[0] == b'k':
            if size != 18:
                raise ProtocolError(f"malformed primary keepalive frame: {size} bytes, expected 18")
            reply = data[17]
            if reply > 1:
                raise ProtocolError(
                    f"malformed primary keepalive frame: reply-requested byte is {reply}, expected 0 or 1"
                )
            wal_end = rd64(data + 1)
            if wal_end > self.server_wal_end:
                self.server_wal_end = wal_end
            if reply:
                self.reply_requested = True
            return 0
        raise ProtocolError(f"unknown CopyData frame type {data[0]:#04x} in the replication stream")

    cdef int _message(self, const uint8_t *p, Py_ssize_t size, uint64_t wal_start) except -1:
        cdef int tag
        cdef _Txn txn
        cdef uint32_t subxid
        cdef Py_ssize_t off
        if size == 0:
            raise ProtocolError("empty pgoutput message")
        tag = p[0]
        if (tag == b'I' or tag == b'U' or tag == b'D' or tag == b'R' or tag == b'T' or tag == b'M'
                or tag == b'Y'):
            txn = self._streaming
            if txn is not None:
                if size < 5:
                    err_short(tag, size, 1)
                subxid = rd32(p + 1)
                off = 5
            else:
                txn = self._current
                subxid = txn.xid if txn is not None else 0
                off = 1
            if tag == b'M':
                return self._logical_message(p, size, off, wal_start, txn)
            if txn is None:
                raise sh.out_of_place(NAMES[tag], "outside a transaction")
            if tag == b'I':
                return change_insert(self, txn, p, size, off, subxid, wal_start)
            if tag == b'U':
                return change_update(self, txn, p, size, off, subxid, wal_start)
            if tag == b'D':
                return change_delete(self, txn, p, size, off, subxid, wal_start)
            if tag == b'R':
                return self._relation(txn, p, size, off, wal_start)
            if tag == b'T':
                return change_truncate(self, txn, p, size, off, subxid, wal_start)
            need(p, size, off, 4, tag)
            off = skip_string(p, size, off + 4, tag)
            off = skip_string(p, size, off, tag)
            return end(size, off, tag)
        return self._control(tag, p, size, wal_start)

    cdef int _control(self, int tag, const uint8_t *p, Py_ssize_t size, uint64_t wal_start) except -1:
        cdef _Txn txn
        cdef uint32_t xid, subxid
        cdef uint64_t abort_lsn = 0, position
        cdef Py_ssize_t pos
        cdef int64_t abort_time
        if tag not in NAMES:
            raise sh.unknown_tag(tag)
        if self._streaming is not None and tag != b'E' and tag != b'O':
            raise sh.out_of_place(NAMES[tag], "inside a streamed block")
        if self._current is not None and tag != b'C' and tag != b'P' and tag != b'O':
            raise sh.out_of_place(NAMES[tag], "inside a transaction")
        if tag == b'B' or tag == b'b':
            if tag == b'B':
                exact(size, 21, tag)
                xid = rd32(p + 17)
            else:
                need(p, size, 1, 28, tag)
                xid = rd32(p + 25)
                end(size, skip_string(p, size, 29, tag), tag)
            self._current = new_txn(xid, False, wal_start, self._spill_dir)
        elif tag == b'C':
            exact(size, 26, tag)
            if self._current is None:
                raise sh.out_of_place(NAMES[tag], "without Begin")
            txn = self._current
            self._current = None
            self._finish(txn, rd64(p + 10), rd64(p + 2), True, b'c', <int64_t>rd64(p + 18), True,
                         wal_start, tag, size)
        elif tag == b'S':
            exact(size, 6, tag)
            if p[5] > 1:
                err(tag, size, f"first-segment byte is {p[5]}, expected 0 or 1")
            xid = rd32(p + 1)
            txn = self._last_stream
            if txn is None or not txn.live or txn.xid != xid:
                txn = self._streams.get(xid)
                if txn is None:
                    txn = new_txn(xid, True, wal_start, self._spill_dir)
                    txn.live = True
                    if not p[5]:  # not its first segment: earlier changes were never received
                        txn.last_sent = MISSED
                    self._streams[xid] = txn
                self._last_stream = txn
            if self._sent > txn.last_sent:
                txn.last_sent = self._sent
            self._streaming = txn
        elif tag == b'E':
            exact(size, 1, tag)
            if self._streaming is None:
                raise sh.out_of_place(NAMES[tag], "outside a streamed block")
            txn = self._streaming
            if self._sent > txn.last_sent:
                txn.last_sent = self._sent
            self._streaming = None
        elif tag == b'c':
            exact(size, 30, tag)
            xid = rd32(p + 1)
            txn = self._pop_stream(xid)
            if txn is None:
                txn = new_txn(xid, True, wal_start, None)
            self._finish(txn, rd64(p + 14), rd64(p + 6), True, b'c', <int64_t>rd64(p + 22), True,
                         wal_start, tag, size)
        elif tag == b'A':
            if size != 9 and size != 25:
                err(tag, size, "expected 9 or 25 bytes")
            xid = rd32(p + 1)
            subxid = rd32(p + 5)
            if size == 25:
                abort_lsn = rd64(p + 9)
            if subxid != xid:
                streamed = self._streams.get(xid)
                if streamed is not None:
                    txn = streamed
                    if txn.aborted is None:
                        txn.aborted = set()
                    txn.aborted.add(subxid)
                return 0
            txn = self._pop_stream(xid)
            if txn is None:
                return 0
            # The abort record's start LSN can equal the end LSN of an earlier commit;
            # +1 keeps rolled-back positions distinct from every version.
            position = (abort_lsn if abort_lsn else wal_start) + 1
            # Decoded in progress only if its last frame went out before it aborted (model.py).
            abort_time = <int64_t>rd64(p + 17) if size == 25 else 0
            self._finish(txn, position, 0, False, b'r', abort_time, size == 25, wal_start, tag, size,
                         F_MAYBE_INCOMPLETE if size != 25 or txn.last_sent >= abort_time else 0)
        elif tag == b'O':
            need(p, size, 1, 8, tag)
            name = read_string(p, size, 9, tag, &pos)
            end(size, pos, tag)
            txn = self._streaming if self._streaming is not None else self._current
            if txn is not None:
                txn.origin = name
        elif tag == b'P':
            need(p, size, 1, 29, tag)
            gid = read_string(p, size, 30, tag, &pos)
            end(size, pos, tag)
            if self._current is None:
                raise sh.out_of_place(NAMES[tag], "without BeginPrepare")
            txn = self._current
            self._current = None
            self._prepared[gid] = txn
        elif tag == b'p':
            need(p, size, 1, 29, tag)
            gid = read_string(p, size, 30, tag, &pos)
            end(size, pos, tag)
            xid = rd32(p + 26)
            txn = self._pop_stream(xid)
            if txn is None:
                txn = new_txn(xid, True, wal_start, None)
            self._prepared[gid] = txn
        elif tag == b'K':
            need(p, size, 1, 29, tag)
            gid = read_string(p, size, 30, tag, &pos)
            end(size, pos, tag)
            xid = rd32(p + 26)
            txn = self._prepared.pop(gid, None)
            if txn is None:
                txn = new_txn(xid, False, wal_start, None)
            self._finish(txn, rd64(p + 10), rd64(p + 2), True, b'c', <int64_t>rd64(p + 18), True,
                         wal_start, tag, size)
        else:  # 'r'
            need(p, size, 1, 37, tag)
            gid = read_string(p, size, 38, tag, &pos)
            end(size, pos, tag)
            xid = rd32(p + 34)
            txn = self._prepared.pop(gid, None)
            if txn is None:
                txn = new_txn(xid, False, wal_start, None)
            self._finish(txn, rd64(p + 10), 0, False, b'r', <int64_t>rd64(p + 26), True,
                         wal_start, tag, size)
        return 0

    cdef _Txn _pop_stream(self, uint32_t xid):
        txn = self._streams.pop(xid, None)
        if txn is None:
            return None
        (<_Txn>txn).live = False
        return <_Txn>txn

    # -- finishing -----------------------------------------------------------------------------
    cdef int _finish(self, _Txn txn, uint64_t position, uint64_t commit_lsn, bint has_commit_lsn,
                     char status, int64_t when, bint has_when, uint64_t wal_start, int tag,
                     Py_ssize_t size, int extra_flags=0) except -1:
        cdef Py_ssize_t i
        cdef Buf text
        cdef bint rolled_back = status == b'r'
        cdef Count *c
        self.memory_bytes -= txn.mem.len
        if status == b'c' and txn.overlay.count:
            for i in range(txn.overlay.cap):
                if txn.overlay.slots[i].rel != NULL:
                    map_put(&self._relations, txn.overlay.slots[i].oid, <object>txn.overlay.slots[i].rel)
        map_clear(&txn.overlay)
        if position <= self._skip_through:
            txn.close()
            return 0
        if not has_when:
            when = model.now_us()
        if not MIN_TIME <= when < MAX_TIME:
            txn.close()
            raise sh.malformed(NAMES[tag], size, f"time {when} is out of range")
        text.data = NULL
        text.len = text.cap = 0
        try:
            buf_u64(&text, position)
            buf_byte(&text, b'\t')
            txn.prefix = PyBytes_FromStringAndSize(text.data, text.len)
            text.len = 0
            put_time(&text, when)
            committed_at = PyBytes_FromStringAndSize(text.data, text.len).decode()
            buf_byte(&text, b'\t')
            txn.time = PyBytes_FromStringAndSize(text.data, text.len)
        finally:
            buf_free(&text)
        txn.flags_or = F_ROLLED_BACK if rolled_back else 0
        aborted = txn.aborted
        counts = {}
        for i in range(txn.ncounts):
            c = &txn.counts[i]
            key = (c.table_id, chr(c.op), rolled_back or (aborted is not None and c.subxid in aborted))
            counts[key] = counts.get(key, 0) + c.n
        self._events.append(
            FinishedTransaction(
                xid=txn.xid,
                position=position,
                commit_lsn=commit_lsn if has_commit_lsn else None,
                committed_at_us=when,
                committed_at_text=committed_at,
                status="r" if rolled_back else "c",
                flags=(1 if txn.streamed else 0) | extra_flags,
                origin=txn.origin,
                change_count=txn.change_count,
                pending_count=txn.pending_count,
                first_lsn=txn.first_lsn,
                last_lsn=wal_start,
                messages=txn.messages,
                counts=counts,
                _source=txn,
            )
        )
        return 0

    # -- buffering -----------------------------------------------------------------------------
    cdef int _end_record(self, _Txn txn, Py_ssize_t start, Py_ssize_t split, uint32_t subxid,
                         uint16_t flags, int64_t table_id, char op, bint pending) except -1:
        self.memory_bytes += end_record(txn, start, split, subxid, flags, table_id, op, pending)
        if self.memory_bytes > self._limit:
            self._spill_largest()
        return 0

    cdef int _spill_largest(self) except -1:
        cdef Py_ssize_t spilled = 0
        candidates = list(self._streams.values()) + list(self._prepared.values())
        if self._current is not None:
            candidates.append(self._current)
        self.memory_bytes -= spill_largest(candidates, self.memory_bytes - self._limit // 2, &spilled)
        self.spilled_transactions += spilled
        return 0

    # -- messages ------------------------------------------------------------------------------
    cdef int _logical_message(self, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                              uint64_t wal_start, _Txn txn) except -1:
        cdef int tag = b'M'
        cdef uint8_t flags
        cdef uint64_t lsn
        cdef uint32_t length
        cdef Py_ssize_t pos
        need(p, size, off, 9, tag)
        flags = p[off]
        if flags > 1:
            err(tag, size, f"unknown flags {flags:#04x}")
        lsn = rd64(p + off + 1)
        prefix = read_string(p, size, off + 9, tag, &pos)
        need(p, size, pos, 4, tag)
        length = rd32(p + pos)
        pos += 4
        if size - pos != length:
            err(tag, size, f"content of {length} bytes announced, {size - pos} bytes left")
        content = PyBytes_FromStringAndSize(<const char *>p + pos, size - pos)
        if not flags:
            self._events.append(LogicalMessage(lsn if lsn else wal_start, prefix, content))
            return 0
        if txn is None:
            raise sh.out_of_place("Message", "outside a transaction")
        txn.messages.append((txn.change_count, lsn if lsn else wal_start, prefix, content))
        return 0

    cdef int _relation(self, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                       uint64_t wal_start) except -1:
        cdef _Rel rel
        body = PyBytes_FromStringAndSize(<const char *>p + off, size - off)
        found = self._by_body.get(body)
        if found is None:
            desc = parse_relation(PyBytes_FromStringAndSize(<const char *>p, size), off, wal_start)
            rel = _Rel.__new__(_Rel)  # described at its first change (_rel)
            rel.oid = desc.oid
            rel.desc = desc
            if len(self._by_body) >= CACHE_LIMIT:
                self._by_body.clear()
            self._by_body[body] = rel
        else:
            rel = found
        if txn.streamed:
            map_put(&txn.overlay, rel.oid, rel)
        else:
            map_put(&self._relations, rel.oid, rel)
        return 0

    cdef _Rel _rel(self, _Txn txn, uint32_t oid, int tag, uint64_t lsn):
        cdef PyObject *found = NULL
        if txn.overlay.count:
            found = map_get(&txn.overlay, oid)
        if found == NULL:
            found = map_get(&self._relations, oid)
            if found == NULL:
                raise sh.unknown_relation(NAMES[tag], oid)
        if (<_Rel>found).info is None:
            self._describe_rel(<_Rel>found, lsn)
        return <_Rel>found

    cdef int _describe_rel(self, _Rel rel, uint64_t lsn) except -1:
        """Describe a relation at the position of the change that uses it first (``lsn``): the
        Relation message before it has none (its names hold from there, docs/store.md)."""
        desc = rel.desc
        if lsn:
            desc = dataclass_replace(desc, lsn=lsn)
        info = self._describe(desc)
        model.check_info(desc, info, self._hash_value is not None)
        rel.setup(rel.oid, info)
        return 0

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot_lines(self, info, copy_rows, *, position, first_ordinal, committed_at_us):
        return snapshot_rows(info, copy_rows, position, first_ordinal, committed_at_us, &self._new,
                             self._max_value, self._hash_value)

    # -- the libpq drain path ------------------------------------------------------------------
    cdef int _choose_drain(self, pgconn) except -1:
        """The libpq path when cdc.capture.libpq vouches for this connection, else psycopg."""
        self._get_copy_data = NULL
        self._freemem = NULL
        self._conn = NULL
        self._drain_conn = pgconn
        self._drain_ptr = getattr(pgconn, "pgconn_ptr", None)
        found = libpq.drain_functions(pgconn)
        if isinstance(found, str):
            self.drain_path = "psycopg"
            libpq.note("psycopg", found)
            return 0
        self._conn = <void *><uintptr_t>found.conn
        self._get_copy_data = <GetCopyData><uintptr_t>found.get_copy_data
        self._freemem = <FreeMem><uintptr_t>found.freemem
        self.drain_path = "libpq"
        libpq.note("libpq", found.path)
        return 0

    cdef Py_ssize_t _drain_libpq(self, pgconn) except -2:
        """drain() with PQgetCopyData called from C: no Python call or object per frame. The
        PGconn * is the one drain() checked on entry: the connection must not be closed while
        drain() runs (its owner closes it; cdc.watchdog never does)."""
        cdef char *buf
        cdef int nbytes
        cdef Py_ssize_t count = 0
        while True:
            buf = NULL
            nbytes = self._get_copy_data(self._conn, &buf, 1)
            if nbytes > 0:
                try:
                    self._frame(<const uint8_t *>buf, nbytes)
                finally:
                    self._freemem(buf)
                count += 1
            elif nbytes == 0:
                return count
            elif nbytes == -1:
                return -1
            elif nbytes == -2:
                raise libpq.copy_failed(pgconn)
            else:
                raise ProtocolError(f"reading the replication stream failed (get_copy_data returned {nbytes})")

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False, embedsignature=False
"""The capture core, compiled: the same interface, bytes and errors as ``cdc/capture/core.py``.

Frames are parsed with C pointers over their bytes; every read is bounds-checked against the
frame's length first. A change's COPY line middle is written into its transaction's C buffer
as it arrives (no Python object per frame, column or change on this path); Python objects are
made per transaction (the event, its counts, a stream's relation overlay), per Relation body
(its description), and on rare paths (oversize and hashed values, errors, spill files).
``core.py`` is the reference: this file mirrors it check for check, and the tests compare the
two on recorded and fuzzed streams.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8

import tempfile

from cdc.capture import _shared as sh
from cdc.capture import model
from cdc.capture.pgoutput import parse_relation
from cdc.capture.model import FinishedTransaction, LogicalMessage, RelationDesc, ColumnDesc
from cdc.errors import ProtocolError

cdef object NAMES = sh.NAMES
cdef Py_ssize_t HEADER = sh.RECORD_HEADER
cdef Py_ssize_t SPILL_FLUSH = sh.SPILL_FLUSH_BYTES
cdef Py_ssize_t CACHE_LIMIT = sh.RELATION_CACHE_LIMIT
cdef int64_t MIN_TIME = model.MIN_TIME_US
cdef int64_t MAX_TIME = model.MAX_TIME_US

cdef enum:
    EXCLUDE = 1
    MASK = 2
    HASH = 3
    ST_NULL = 0
    ST_VALUE = 1
    ST_UNCHANGED = 2
    F_ROLLED_BACK = 1
    F_BEFORE = 2
    F_OVERSIZE = 8
    F_KEY_UNKNOWN = 16

cdef const char *HEXDIGITS = b"0123456789abcdef"
cdef uint8_t ESC[256]


cdef void _init_escapes():
    cdef int c
    for c in range(256):
        ESC[c] = 0
    for c in range(32):
        ESC[c] = b'u'
    ESC[8] = b'b'
    ESC[12] = b'f'
    ESC[10] = b'n'
    ESC[13] = b'r'
    ESC[9] = b't'
    ESC[34] = b'"'
    ESC[92] = b'\\'


_init_escapes()


# ---------------------------------------------------------------------------------------- buffers

cdef struct Buf:
    char *data
    Py_ssize_t len
    Py_ssize_t cap


cdef int buf_grow(Buf *b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = b.cap * 2 if b.cap else 256
    cdef char *p
    while cap < b.len + need:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_reserve(Buf *b, Py_ssize_t need) except -1:
    if b.len + need > b.cap:
        return buf_grow(b, need)
    return 0


cdef inline int buf_put(Buf *b, const char *s, Py_ssize_t n) except -1:
    if b.len + n > b.cap:
        buf_grow(b, n)
    memcpy(b.data + b.len, s, n)
    b.len += n
    return 0


cdef inline int buf_byte(Buf *b, char c) except -1:
    if b.len + 1 > b.cap:
        buf_grow(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0


cdef inline int buf_bytes(Buf *b, bytes s) except -1:
    return buf_put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef int buf_u64(Buf *b, uint64_t v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    if v == 0:
        return buf_byte(b, b'0')
    while v:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
    return buf_put(b, tmp + i, 24 - i)


cdef void buf_free(Buf *b):
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0


cdef inline uint16_t rd16(const uint8_t *p):
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t rd32(const uint8_t *p):
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t rd64(const uint8_t *p):
    return (<uint64_t>rd32(p) << 32) | rd32(p + 4)


cdef inline void wr32le(char *p, uint32_t v):
    p[0] = <char>(v & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>((v >> 16) & 0xFF)
    p[3] = <char>((v >> 24) & 0xFF)


cdef inline uint32_t rd32le(const uint8_t *p):
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


# ---------------------------------------------------------------------------------------- text

cdef Py_ssize_t utf8_invalid(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    """-1 when s[0:n] is well-formed UTF-8 (as Python's strict decoder has it), else an index."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        if c < 0xC2:
            return i
        if c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return i
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return i
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return i
            if c == 0xE0 and c1 < 0xA0:
                return i
            if c == 0xED and c1 >= 0xA0:
                return i
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return i
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return i
            if c == 0xF0 and c1 < 0x90:
                return i
            if c == 0xF4 and c1 >= 0x90:
                return i
            i += 4
        else:
            return i
    return -1


cdef bint is_integer(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    """0 | -?[1-9][0-9]*"""
    cdef Py_ssize_t i = 0
    if n == 1 and s[0] == b'0':
        return True
    if n > 0 and s[0] == b'-':
        i = 1
    if i >= n or s[i] < b'1' or s[i] > b'9':
        return False
    i += 1
    while i < n:
        if s[i] < b'0' or s[i] > b'9':
            return False
        i += 1
    return True


cdef int put_json(Buf *b, const uint8_t *s, Py_ssize_t n) except -1:
    """s as a JSON string escaped as escape_json does, with every backslash doubled (COPY)."""
    cdef Py_ssize_t i = 0, run
    cdef uint8_t c, e
    cdef char *d
    buf_reserve(b, n + 2)
    b.data[b.len] = b'"'
    b.len += 1
    while i < n:
        run = i
        while i < n and ESC[s[i]] == 0:
            i += 1
        if i > run:
            buf_put(b, <const char *>s + run, i - run)
        if i >= n:
            break
        c = s[i]
        e = ESC[c]
        buf_reserve(b, 7)
        d = b.data + b.len
        d[0] = b'\\'
        d[1] = b'\\'
        if e == b'u':
            d[2] = b'u'
            d[3] = b'0'
            d[4] = b'0'
            d[5] = HEXDIGITS[c >> 4]
            d[6] = HEXDIGITS[c & 15]
            b.len += 7
        elif e == b'\\':
            d[2] = b'\\'
            d[3] = b'\\'
            b.len += 4
        else:
            d[2] = <char>e
            b.len += 3
        i += 1
    return buf_byte(b, b'"')


cdef int put_time(Buf *b, int64_t us) except -1:
    """'YYYY-MM-DD HH:MM:SS.ffffff+00' of PostgreSQL epoch microseconds (range checked by the caller)."""
    cdef int64_t days = us // 86400000000
    cdef int64_t rest = us - days * 86400000000
    cdef int64_t z, era, doe, yoe, y, doy, mp, d, m, secs, micros
    cdef char tmp[32]
    if rest < 0:
        days -= 1
        rest += 86400000000
    z = days + 10957 + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    secs = rest // 1000000
    micros = rest % 1000000
    tmp[0] = <char>(48 + y // 1000 % 10)
    tmp[1] = <char>(48 + y // 100 % 10)
    tmp[2] = <char>(48 + y // 10 % 10)
    tmp[3] = <char>(48 + y % 10)
    tmp[4] = b'-'
    tmp[5] = <char>(48 + m // 10)
    tmp[6] = <char>(48 + m % 10)
    tmp[7] = b'-'
    tmp[8] = <char>(48 + d // 10)
    tmp[9] = <char>(48 + d % 10)
    tmp[10] = b' '
    tmp[11] = <char>(48 + secs // 36000)
    tmp[12] = <char>(48 + secs // 3600 % 10)
    tmp[13] = b':'
    tmp[14] = <char>(48 + secs % 3600 // 600)
    tmp[15] = <char>(48 + secs % 3600 // 60 % 10)
    tmp[16] = b':'
    tmp[17] = <char>(48 + secs % 60 // 10)
    tmp[18] = <char>(48 + secs % 10)
    tmp[19] = b'.'
    tmp[20] = <char>(48 + micros // 100000)
    tmp[21] = <char>(48 + micros // 10000 % 10)
    tmp[22] = <char>(48 + micros // 1000 % 10)
    tmp[23] = <char>(48 + micros // 100 % 10)
    tmp[24] = <char>(48 + micros // 10 % 10)
    tmp[25] = <char>(48 + micros % 10)
    tmp[26] = b'+'
    tmp[27] = b'0'
    tmp[28] = b'0'
    return buf_put(b, tmp, 29)


def format_time(int64_t us):
    """The compiled time text (tested equal to cdc.capture.model.format_time)."""
    cdef Buf b
    b.data = NULL
    b.len = 0
    b.cap = 0
    if not MIN_TIME <= us < MAX_TIME:
        raise ValueError(f"time {us} is out of range")
    try:
        put_time(&b, us)
        return PyBytes_FromStringAndSize(b.data, b.len).decode()
    finally:
        buf_free(&b)


# ---------------------------------------------------------------------------------------- errors (cold)

cdef int err_short(int tag, Py_ssize_t size, Py_ssize_t pos) except -1:
    raise sh.short(NAMES[tag], size, pos)


cdef int err(int tag, Py_ssize_t size, str detail) except -1:
    raise sh.malformed(NAMES[tag], size, detail)


cdef int err_text(int tag, Py_ssize_t size, Py_ssize_t pos) except -1:
    raise sh.malformed(NAMES[tag], size, f"text at offset {pos} is not valid UTF-8")


cdef int err_trailing(int tag, Py_ssize_t size, Py_ssize_t pos) except -1:
    raise sh.malformed(NAMES[tag], size, f"{size - pos} unexpected trailing bytes at offset {pos}")


cdef inline int need(const uint8_t *p, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t n, int tag) except -1:
    if pos + n > size:
        err_short(tag, size, pos)
    return 0


cdef inline int end(Py_ssize_t size, Py_ssize_t pos, int tag) except -1:
    if pos != size:
        err_trailing(tag, size, pos)
    return 0


cdef inline int exact(Py_ssize_t size, Py_ssize_t want, int tag) except -1:
    if size < want:
        err_short(tag, size, size)
    return end(size, want, tag)


cdef Py_ssize_t skip_string(const uint8_t *p, Py_ssize_t size, Py_ssize_t pos, int tag) except -1:
    """Validate a NUL-terminated UTF-8 string at pos; the offset after its NUL."""
    cdef const void *found = NULL
    if pos < size:
        found = memchr(p + pos, 0, size - pos)
    if found == NULL:
        err(tag, size, f"string at offset {pos} is not NUL-terminated")
    cdef Py_ssize_t stop = <const uint8_t *>found - p
    if utf8_invalid(p + pos, stop - pos) >= 0:
        err_text(tag, size, pos)
    return stop + 1


cdef str read_string(const uint8_t *p, Py_ssize_t size, Py_ssize_t pos, int tag, Py_ssize_t *after):
    cdef Py_ssize_t stop = skip_string(p, size, pos, tag) - 1
    after[0] = stop + 1
    return PyUnicode_DecodeUTF8(<const char *>p + pos, stop - pos, NULL)


# ---------------------------------------------------------------------------------------- relations

cdef class _Rel:
    cdef readonly object info
    cdef uint32_t oid
    cdef int natts
    cdef int nkey
    cdef int *key
    cdef uint8_t *is_key
    cdef uint8_t *kinds
    cdef uint8_t *policies
    cdef list names_json
    cdef list pending
    cdef bytes ids
    cdef int64_t table_id
    cdef const char **name_ptr
    cdef Py_ssize_t *name_len

    def __cinit__(self):
        self.key = NULL
        self.is_key = NULL
        self.kinds = NULL
        self.policies = NULL
        self.name_ptr = NULL
        self.name_len = NULL

    def __dealloc__(self):
        free(self.key)
        free(self.is_key)
        free(self.kinds)
        free(self.policies)
        free(self.name_ptr)
        free(self.name_len)

    cdef int setup(self, uint32_t oid, object info) except -1:
        cdef int i, n
        self.oid = oid
        self.info = info
        names_json, pending, ids, kinds, policies = sh.relation_texts(info)
        self.names_json = names_json
        self.pending = pending
        self.ids = ids
        self.table_id = info.table_id
        n = len(kinds)
        self.natts = n
        self.nkey = len(info.key)
        self.key = <int *>malloc(sizeof(int) * (self.nkey + 1))
        self.is_key = <uint8_t *>malloc(n + 1)
        self.kinds = <uint8_t *>malloc(n + 1)
        self.policies = <uint8_t *>malloc(n + 1)
        self.name_ptr = <const char **>malloc(sizeof(char *) * (n + 1))
        self.name_len = <Py_ssize_t *>malloc(sizeof(Py_ssize_t) * (n + 1))
        if (self.key == NULL or self.is_key == NULL or self.kinds == NULL or self.policies == NULL
                or self.name_ptr == NULL or self.name_len == NULL):
            raise MemoryError()
        memset(self.is_key, 0, n + 1)
        for i in range(n):
            self.kinds[i] = kinds[i]
            self.policies[i] = policies[i]
            self.name_ptr[i] = PyBytes_AS_STRING(names_json[i])
            self.name_len[i] = PyBytes_GET_SIZE(names_json[i])
        for i in range(self.nkey):
            self.key[i] = info.key[i]
            self.is_key[self.key[i]] = 1
        return 0


cdef struct Slot:
    uint32_t oid
    PyObject *rel


cdef struct RelMap:
    Slot *slots
    Py_ssize_t cap
    Py_ssize_t count


cdef inline PyObject *map_get(RelMap *m, uint32_t oid) noexcept:
    cdef Py_ssize_t h
    if m.cap == 0:
        return NULL
    h = (<uint64_t>oid * 2654435761u) & (m.cap - 1)
    while True:
        if m.slots[h].rel == NULL:
            return NULL
        if m.slots[h].oid == oid:
            return m.slots[h].rel
        h = (h + 1) & (m.cap - 1)


cdef int map_put(RelMap *m, uint32_t oid, object rel) except -1:
    cdef Slot *old
    cdef Py_ssize_t old_cap, i, h
    if (m.count + 1) * 2 > m.cap:
        old = m.slots
        old_cap = m.cap
        m.cap = m.cap * 2 if m.cap else 8
        m.slots = <Slot *>malloc(sizeof(Slot) * m.cap)
        if m.slots == NULL:
            m.slots = old
            m.cap = old_cap
            raise MemoryError()
        memset(m.slots, 0, sizeof(Slot) * m.cap)
        for i in range(old_cap):
            if old[i].rel != NULL:
                h = (<uint64_t>old[i].oid * 2654435761u) & (m.cap - 1)
                while m.slots[h].rel != NULL:
                    h = (h + 1) & (m.cap - 1)
                m.slots[h] = old[i]
        free(old)
    h = (<uint64_t>oid * 2654435761u) & (m.cap - 1)
    while m.slots[h].rel != NULL and m.slots[h].oid != oid:
        h = (h + 1) & (m.cap - 1)
    Py_INCREF(rel)
    if m.slots[h].rel != NULL:
        Py_XDECREF(m.slots[h].rel)
    else:
        m.count += 1
    m.slots[h].oid = oid
    m.slots[h].rel = <PyObject *>rel
    return 0


cdef void map_clear(RelMap *m):
    cdef Py_ssize_t i
    for i in range(m.cap):
        if m.slots[i].rel != NULL:
            Py_XDECREF(m.slots[i].rel)
    free(m.slots)
    m.slots = NULL
    m.cap = 0
    m.count = 0


# ---------------------------------------------------------------------------------------- transactions

cdef struct Count:
    int64_t table_id
    uint32_t subxid
    char op
    Py_ssize_t n


cdef class _Txn:
    cdef uint32_t xid
    cdef bint streamed
    cdef bint live  # in the Core's stream table
    cdef uint64_t first_lsn
    cdef Buf mem
    cdef object file
    cdef object spill_dir
    cdef Py_ssize_t change_count
    cdef Py_ssize_t pending_count
    cdef object origin
    cdef list messages
    cdef RelMap overlay
    cdef set aborted
    cdef Count *counts
    cdef Py_ssize_t ncounts
    cdef Py_ssize_t counts_cap
    cdef bytes prefix
    cdef bytes time
    cdef uint16_t flags_or

    def __cinit__(self):
        self.mem.data = NULL
        self.mem.len = 0
        self.mem.cap = 0
        self.overlay.slots = NULL
        self.overlay.cap = 0
        self.overlay.count = 0
        self.counts = NULL
        self.ncounts = 0
        self.counts_cap = 0

    def __dealloc__(self):
        buf_free(&self.mem)
        map_clear(&self.overlay)
        free(self.counts)

    cdef int count(self, int64_t table_id, char op, uint32_t subxid) except -1:
        cdef Py_ssize_t i, stop
        cdef Count *c
        stop = self.ncounts - 8 if self.ncounts > 8 else 0
        i = self.ncounts - 1
        while i >= stop:
            c = &self.counts[i]
            if c.table_id == table_id and c.op == op and c.subxid == subxid:
                c.n += 1
                return 0
            i -= 1
        if self.ncounts == self.counts_cap:
            self.counts_cap = self.counts_cap * 2 if self.counts_cap else 4
            c = <Count *>realloc(self.counts, sizeof(Count) * self.counts_cap)
            if c == NULL:
                raise MemoryError()
            self.counts = c
        c = &self.counts[self.ncounts]
        c.table_id = table_id
        c.op = op
        c.subxid = subxid
        c.n = 1
        self.ncounts += 1
        return 0

    cdef Py_ssize_t flush(self) except -1:
        cdef Py_ssize_t freed = self.mem.len
        if self.file is None:
            # Unlinked at once: nothing is left behind if the process dies.
            self.file = tempfile.TemporaryFile(prefix="cdc-spill-", dir=self.spill_dir)
        if freed:
            self.file.write(PyBytes_FromStringAndSize(self.mem.data, self.mem.len))
            self.mem.len = 0
        if self.mem.cap > 4 * SPILL_FLUSH:
            buf_free(&self.mem)
        return freed

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        buf_free(&self.mem)

    def chunks(self, Py_ssize_t max_bytes):
        cdef Buf out
        cdef Buf carry
        cdef Py_ssize_t pos, stop, start, length, split, ordinal = 0, line_start, size = 0
        cdef uint32_t subxid
        cdef uint16_t flags
        cdef const uint8_t *data
        cdef bint from_file = self.file is not None
        cdef set aborted = self.aborted
        out.data = NULL
        out.len = out.cap = 0
        carry.data = NULL
        carry.len = carry.cap = 0
        try:
            if from_file:
                if self.mem.len:
                    self.file.write(PyBytes_FromStringAndSize(self.mem.data, self.mem.len))
                self.mem.len = 0
                self.file.flush()
                self.file.seek(0)
            else:
                carry = self.mem
                self.mem.data = NULL
                self.mem.len = 0
                self.mem.cap = 0
            while True:
                if from_file:
                    block = self.file.read(1 << 20)
                    if not block:
                        break
                    buf_bytes(&carry, block)
                data = <const uint8_t *>carry.data
                pos = 0
                while pos + HEADER <= carry.len:
                    length = rd32le(data + pos)
                    stop = pos + HEADER + length
                    if stop > carry.len:
                        break
                    subxid = rd32le(data + pos + 4)
                    flags = data[pos + 8] | (<uint16_t>data[pos + 9] << 8)
                    split = rd32le(data + pos + 10)
                    start = pos + HEADER
                    flags |= self.flags_or
                    if aborted is not None and subxid in aborted:
                        flags |= F_ROLLED_BACK
                    line_start = out.len
                    buf_bytes(&out, self.prefix)
                    buf_u64(&out, ordinal)
                    buf_byte(&out, b'\t')
                    buf_bytes(&out, self.time)
                    buf_put(&out, <const char *>data + start, split)
                    buf_byte(&out, b'\t')
                    buf_u64(&out, flags)
                    buf_put(&out, <const char *>data + start + split, length - split)
                    ordinal += 1
                    if size and size + (out.len - line_start) > max_bytes:
                        chunk = PyBytes_FromStringAndSize(out.data, line_start)
                        memmove(out.data, out.data + line_start, out.len - line_start)
                        out.len -= line_start
                        size = out.len
                        yield chunk
                        data = <const uint8_t *>carry.data
                    else:
                        size += out.len - line_start
                    pos = stop
                memmove(carry.data, carry.data + pos, carry.len - pos)
                carry.len -= pos
                if not from_file:
                    break
            if carry.len:
                raise ProtocolError("spill file truncated")
            if out.len:
                chunk = PyBytes_FromStringAndSize(out.data, out.len)
                buf_free(&out)
                yield chunk
        finally:
            buf_free(&out)
            buf_free(&carry)
            self.close()


cdef _Txn new_txn(uint32_t xid, bint streamed, uint64_t first_lsn, object spill_dir):
    cdef _Txn txn = _Txn.__new__(_Txn)
    txn.xid = xid
    txn.streamed = streamed
    txn.first_lsn = first_lsn
    txn.spill_dir = spill_dir
    txn.messages = []
    return txn


cdef struct Cols:
    Py_ssize_t cap
    uint8_t *state
    Py_ssize_t *off
    Py_ssize_t *ln


cdef int cols_reserve(Cols *c, Py_ssize_t n) except -1:
    if n <= c.cap:
        return 0
    free(c.state)
    free(c.off)
    free(c.ln)
    c.state = <uint8_t *>malloc(n)
    c.off = <Py_ssize_t *>malloc(sizeof(Py_ssize_t) * n)
    c.ln = <Py_ssize_t *>malloc(sizeof(Py_ssize_t) * n)
    if c.state == NULL or c.off == NULL or c.ln == NULL:
        c.cap = 0
        raise MemoryError()
    c.cap = n
    return 0


cdef void cols_free(Cols *c):
    free(c.state)
    free(c.off)
    free(c.ln)
    c.state = NULL
    c.off = NULL
    c.ln = NULL
    c.cap = 0


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
    cdef public bint reply_requested
    cdef readonly Py_ssize_t memory_bytes
    cdef readonly Py_ssize_t spilled_transactions

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
        self.reply_requested = False
        self.memory_bytes = 0
        self.spilled_transactions = 0

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
                return self._insert(txn, p, size, off, subxid, wal_start)
            if tag == b'U':
                return self._update(txn, p, size, off, subxid, wal_start)
            if tag == b'D':
                return self._delete(txn, p, size, off, subxid, wal_start)
            if tag == b'R':
                return self._relation(txn, p, size, off, wal_start)
            if tag == b'T':
                return self._truncate(txn, p, size, off, subxid, wal_start)
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
        cdef object abort_time
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
                    self._streams[xid] = txn
                self._last_stream = txn
            self._streaming = txn
        elif tag == b'E':
            exact(size, 1, tag)
            if self._streaming is None:
                raise sh.out_of_place(NAMES[tag], "outside a streamed block")
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
            self._finish(txn, position, 0, False, b'r', <int64_t>rd64(p + 17) if size == 25 else 0,
                         size == 25, wal_start, tag, size)
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
                     Py_ssize_t size) except -1:
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
                flags=1 if txn.streamed else 0,
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
    cdef inline Py_ssize_t _begin_record(self, _Txn txn, _Rel rel, char op) except -1:
        cdef Py_ssize_t start = txn.mem.len
        buf_reserve(&txn.mem, HEADER + PyBytes_GET_SIZE(rel.ids) + 1)
        txn.mem.len += HEADER
        buf_bytes(&txn.mem, rel.ids)
        buf_byte(&txn.mem, op)
        return start

    cdef int _end_record(self, _Txn txn, Py_ssize_t start, Py_ssize_t split, uint32_t subxid,
                         uint16_t flags, int64_t table_id, char op, bint pending) except -1:
        cdef char *h = txn.mem.data + start
        cdef Py_ssize_t added = txn.mem.len - start
        wr32le(h, <uint32_t>(added - HEADER))
        wr32le(h + 4, subxid)
        h[8] = <char>(flags & 0xFF)
        h[9] = <char>(flags >> 8)
        wr32le(h + 10, <uint32_t>split)
        txn.change_count += 1
        if pending:
            txn.pending_count += 1
        txn.count(table_id, op, subxid)
        self.memory_bytes += added
        if txn.file is not None and txn.mem.len >= SPILL_FLUSH:
            self.memory_bytes -= txn.flush()
        if self.memory_bytes > self._limit:
            self._spill_largest()
        return 0

    cdef int _spill_largest(self) except -1:
        cdef _Txn largest
        cdef _Txn txn
        candidates = list(self._streams.values()) + list(self._prepared.values())
        if self._current is not None:
            candidates.append(self._current)
        while self.memory_bytes > self._limit // 2 and candidates:
            largest = candidates[0]
            for item in candidates:
                txn = item
                if txn.mem.len > largest.mem.len:
                    largest = txn
            if not largest.mem.len:
                break
            if largest.file is None:
                self.spilled_transactions += 1
            self.memory_bytes -= largest.flush()
            candidates.remove(largest)
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
            info = self._describe(desc)
            model.check_info(desc, info, self._hash_value is not None)
            rel = _Rel.__new__(_Rel)
            rel.setup(desc.oid, info)
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

    cdef _Rel _rel(self, _Txn txn, uint32_t oid, int tag):
        cdef PyObject *found = NULL
        if txn.overlay.count:
            found = map_get(&txn.overlay, oid)
        if found == NULL:
            found = map_get(&self._relations, oid)
            if found == NULL:
                raise sh.unknown_relation(NAMES[tag], oid)
        return <_Rel>found

    # -- changes -------------------------------------------------------------------------------
    cdef Py_ssize_t _tuple(self, _Rel rel, const uint8_t *p, Py_ssize_t size, Py_ssize_t pos, int tag,
                           bint allow_u, Cols *cols) except -1:
        cdef int natts, i
        cdef uint8_t kind, k
        cdef Py_ssize_t start, length
        need(p, size, pos, 2, tag)
        natts = rd16(p + pos)
        if natts != rel.natts:
            err(tag, size, f"tuple of {natts} columns for relation {rel.oid} whose schema has {rel.natts}")
        pos += 2
        cols_reserve(cols, natts)
        for i in range(natts):
            if pos >= size:
                err_short(tag, size, pos)
            kind = p[pos]
            if kind == b't':
                if pos + 5 > size:
                    err_short(tag, size, pos + 1)
                length = rd32(p + pos + 1)
                start = pos + 5
                pos = start + length
                if pos > size:
                    err_short(tag, size, start)
                cols.state[i] = ST_VALUE
                cols.off[i] = start
                cols.ln[i] = length
                k = rel.kinds[i]
                if k == 0:
                    if utf8_invalid(p + start, length) >= 0:
                        err_text(tag, size, start)
                elif k == 1:
                    if not is_integer(p + start, length):
                        if utf8_invalid(p + start, length) >= 0:
                            err_text(tag, size, start)
                        err(tag, size, f"value at offset {start} is not an integer")
                else:
                    if not (length == 1 and (p[start] == b't' or p[start] == b'f')):
                        if utf8_invalid(p + start, length) >= 0:
                            err_text(tag, size, start)
                        err(tag, size, f"value at offset {start} is not a boolean")
            elif kind == b'n':
                cols.state[i] = ST_NULL
                pos += 1
            elif kind == b'u':
                if not allow_u:
                    err(tag, size, f"unchanged TOAST value at offset {pos}")
                cols.state[i] = ST_UNCHANGED
                pos += 1
            elif kind == b'b':
                err(tag, size, f"binary value at offset {pos} (binary 'true' is not supported)")
            else:
                err(tag, size, f"unknown tuple column kind {kind:#04x} at offset {pos}")
        return pos

    cdef int _value(self, Buf *b, uint8_t kind, const uint8_t *s, Py_ssize_t n, bint key_form,
                    int *flags) except -1:
        if n > self._max_value:
            buf_bytes(b, sh.oversize_json(PyBytes_FromStringAndSize(<const char *>s, n), key_form))
            flags[0] |= F_OVERSIZE
        elif kind == 0:
            put_json(b, s, n)
        elif kind == 1:
            buf_put(b, <const char *>s, n)
        elif s[0] == b't':
            buf_put(b, b"true", 4)
        else:
            buf_put(b, b"false", 5)
        return 0

    cdef int _key(self, Buf *b, _Rel rel, const uint8_t *base, Cols *c, int *flags) except -1:
        """Write the key_text; 0 (and nothing written) when a key column is unknown."""
        cdef Py_ssize_t start = b.len
        cdef int j, i
        cdef int local = 0
        buf_byte(b, b'[')
        for j in range(rel.nkey):
            i = rel.key[j]
            if j:
                buf_put(b, b", ", 2)
            if c.state[i] == ST_NULL:
                buf_put(b, b"null", 4)
            elif c.state[i] == ST_UNCHANGED:
                b.len = start
                return 0
            else:
                self._value(b, rel.kinds[i], base + c.off[i], c.ln[i], True, &local)
        buf_byte(b, b']')
        flags[0] |= local
        return 1

    cdef int _image(self, Buf *b, _Rel rel, const uint8_t *base, Cols *c, bint only_key,
                    int *flags) except -1:
        cdef int i
        cdef bint first = True
        cdef uint8_t st, policy
        buf_byte(b, b'{')
        for i in range(rel.natts):
            if only_key and not rel.is_key[i]:
                continue
            st = c.state[i]
            policy = rel.policies[i]
            if st == ST_UNCHANGED and policy != EXCLUDE:
                continue
            if not first:
                buf_byte(b, b',')
            first = False
            buf_put(b, rel.name_ptr[i], rel.name_len[i])
            if policy == EXCLUDE or st == ST_NULL:
                buf_put(b, b"null", 4)
            elif policy == MASK:
                buf_put(b, b'"****"', 6)
            elif policy == HASH:
                buf_bytes(b, sh.hashed_json(self._hash_value,
                                            PyBytes_FromStringAndSize(<const char *>base + c.off[i], c.ln[i])))
            else:
                self._value(b, rel.kinds[i], base + c.off[i], c.ln[i], False, flags)
        return buf_byte(b, b'}')

    cdef inline int _lsn_xid(self, _Txn txn, uint64_t lsn, uint32_t subxid) except -1:
        cdef Buf *m = &txn.mem
        buf_byte(m, b'\t')
        buf_u64(m, lsn)
        buf_byte(m, b'\t')
        if subxid == txn.xid:
            buf_put(m, b"\\N", 2)
        else:
            buf_u64(m, subxid)
        return buf_byte(m, b'\t')

    cdef int _insert(self, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                     uint32_t subxid, uint64_t lsn) except -1:
        cdef int tag = b'I'
        cdef _Rel rel
        cdef Py_ssize_t pos, start, split
        cdef int flags = 0
        need(p, size, off, 4, tag)
        rel = self._rel(txn, rd32(p + off), tag)
        pos = off + 4
        need(p, size, pos, 1, tag)
        if p[pos] != b'N':
            err(tag, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        pos = self._tuple(rel, p, size, pos + 1, tag, False, &self._new)
        end(size, pos, tag)
        start = self._begin_record(txn, rel, b'I')
        try:
            split = txn.mem.len - start - HEADER
            self._lsn_xid(txn, lsn, subxid)
            self._key(&txn.mem, rel, p, &self._new, &flags)
            buf_byte(&txn.mem, b'\t')
            self._image(&txn.mem, rel, p, &self._new, False, &flags)
            buf_put(&txn.mem, b"\t\\N\t\\N\t\\N\n", 10)
        except BaseException:
            txn.mem.len = start
            raise
        return self._end_record(txn, start, split, subxid, flags, rel.table_id, b'I', False)

    cdef int _update(self, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                     uint32_t subxid, uint64_t lsn) except -1:
        cdef int tag = b'U'
        cdef _Rel rel
        cdef Py_ssize_t pos, start, split, key_start, key_len, i
        cdef int flags = 0
        cdef int old_flags = 0
        cdef uint8_t kind
        cdef bint has_old = False, full, has_key, has_old_key, pending = False
        cdef Cols *old = &self._old
        cdef Cols *new = &self._new
        need(p, size, off, 4, tag)
        rel = self._rel(txn, rd32(p + off), tag)
        pos = off + 4
        need(p, size, pos, 1, tag)
        kind = p[pos]
        if kind == b'K' or kind == b'O':
            pos = self._tuple(rel, p, size, pos + 1, tag, True, old)
            has_old = True
            need(p, size, pos, 1, tag)
            if p[pos] != b'N':
                err(tag, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        elif kind != b'N':
            err(tag, size, f"expected 'K', 'O' or 'N' at offset {pos}, got {kind:#04x}")
        pos = self._tuple(rel, p, size, pos + 1, tag, True, new)
        end(size, pos, tag)
        full = kind == b'O'
        if has_old:
            for i in range(rel.natts):
                if new.state[i] == ST_UNCHANGED and (full or rel.is_key[i]) and old.state[i] != ST_UNCHANGED:
                    new.state[i] = old.state[i]
                    new.off[i] = old.off[i]
                    new.ln[i] = old.ln[i]
        start = self._begin_record(txn, rel, b'U')
        try:
            split = txn.mem.len - start - HEADER
            self._lsn_xid(txn, lsn, subxid)
            key_start = txn.mem.len
            has_key = self._key(&txn.mem, rel, p, new, &flags)
            key_len = txn.mem.len - key_start
            if not has_key:
                flags |= F_KEY_UNKNOWN
                buf_put(&txn.mem, b"\\N", 2)
            buf_byte(&txn.mem, b'\t')
            self._image(&txn.mem, rel, p, new, False, &flags)
            buf_byte(&txn.mem, b'\t')
            if has_old and full:
                self._image(&txn.mem, rel, p, old, False, &flags)
                flags |= F_BEFORE
            else:
                buf_put(&txn.mem, b"\\N", 2)
            buf_byte(&txn.mem, b'\t')
            has_old_key = False
            if has_old:
                self._scratch.len = 0
                if self._key(&self._scratch, rel, p, old, &old_flags):
                    if not has_key or key_len != self._scratch.len or memcmp(
                            txn.mem.data + key_start, self._scratch.data, key_len) != 0:
                        has_old_key = True
                        flags |= old_flags
            if has_old_key:
                buf_put(&txn.mem, self._scratch.data, self._scratch.len)
            else:
                buf_put(&txn.mem, b"\\N", 2)
            buf_byte(&txn.mem, b'\t')
            for i in range(rel.natts):
                if new.state[i] == ST_UNCHANGED and rel.policies[i] != EXCLUDE:
                    buf_byte(&txn.mem, b',' if pending else b'{')
                    pending = True
                    buf_bytes(&txn.mem, rel.pending[i])
            if pending:
                buf_byte(&txn.mem, b'}')
            else:
                buf_put(&txn.mem, b"\\N", 2)
            buf_byte(&txn.mem, b'\n')
        except BaseException:
            txn.mem.len = start
            raise
        return self._end_record(txn, start, split, subxid, flags, rel.table_id, b'U', pending)

    cdef int _delete(self, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                     uint32_t subxid, uint64_t lsn) except -1:
        cdef int tag = b'D'
        cdef _Rel rel
        cdef Py_ssize_t pos, start, split
        cdef int flags = 0
        cdef uint8_t kind
        cdef bint full
        need(p, size, off, 4, tag)
        rel = self._rel(txn, rd32(p + off), tag)
        pos = off + 4
        need(p, size, pos, 1, tag)
        kind = p[pos]
        if kind != b'K' and kind != b'O':
            err(tag, size, f"expected 'K' or 'O' at offset {pos}, got {kind:#04x}")
        pos = self._tuple(rel, p, size, pos + 1, tag, True, &self._old)
        end(size, pos, tag)
        full = kind == b'O'
        start = self._begin_record(txn, rel, b'D')
        try:
            split = txn.mem.len - start - HEADER
            self._lsn_xid(txn, lsn, subxid)
            if not self._key(&txn.mem, rel, p, &self._old, &flags):
                flags |= F_KEY_UNKNOWN
                buf_put(&txn.mem, b"\\N", 2)
            buf_byte(&txn.mem, b'\t')
            self._image(&txn.mem, rel, p, &self._old, not full, &flags)
            if full:
                flags |= F_BEFORE
            buf_put(&txn.mem, b"\t\\N\t\\N\t\\N\n", 10)
        except BaseException:
            txn.mem.len = start
            raise
        return self._end_record(txn, start, split, subxid, flags, rel.table_id, b'D', False)

    cdef int _truncate(self, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                       uint32_t subxid, uint64_t lsn) except -1:
        cdef int tag = b'T'
        cdef uint32_t count, i
        cdef Py_ssize_t pos, start, split
        cdef _Rel rel
        need(p, size, off, 5, tag)
        count = rd32(p + off)
        pos = off + 5
        if size - pos != 4 * <Py_ssize_t>count:
            err(tag, size, f"{count} relation oids announced, {size - pos} bytes left")
        rels = [self._rel(txn, rd32(p + pos + 4 * i), tag) for i in range(count)]
        for item in rels:
            rel = item
            start = self._begin_record(txn, rel, b'T')
            split = txn.mem.len - start - HEADER
            self._lsn_xid(txn, lsn, subxid)
            buf_put(&txn.mem, b"\\N\t\\N\t\\N\t\\N\t\\N\n", 15)
            self._end_record(txn, start, split, subxid, 0, rel.table_id, b'T', False)
        return 0

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot_lines(self, info, copy_rows, *, position, first_ordinal, committed_at_us):
        cdef _Rel rel
        cdef Buf out
        cdef Buf values
        cdef Cols *cols = &self._new
        cdef const uint8_t *data
        cdef Py_ssize_t size, line, line_end, field, field_end, nfields, i, row = 0, k
        cdef uint64_t pos_value = position
        cdef uint64_t ordinal = first_ordinal
        cdef int64_t when = committed_at_us
        cdef int flags
        cdef int natts = len(info.names)
        cdef const uint8_t *f
        cdef Py_ssize_t n
        cdef uint8_t kind
        desc = RelationDesc(0, "", "", "d", tuple(ColumnDesc(name, 0, -1, False) for name in info.names), 0)
        model.check_info(desc, info, self._hash_value is not None)
        if not MIN_TIME <= when < MAX_TIME:
            raise ProtocolError(f"snapshot time {committed_at_us} is out of range")
        rel = _Rel.__new__(_Rel)
        rel.setup(0, info)
        raw = bytes(copy_rows)
        data = <const uint8_t *>PyBytes_AS_STRING(raw)
        size = PyBytes_GET_SIZE(raw)
        if size == 0:
            return b"", 0
        if data[size - 1] != b'\n':
            raise sh.bad_snapshot(raw.count(b"\n"), "the last line is not complete")
        out.data = NULL
        out.len = out.cap = 0
        values.data = NULL
        values.len = values.cap = 0
        cols_reserve(cols, natts)
        try:
            line = 0
            while line < size:
                line_end = line
                while data[line_end] != b'\n':
                    line_end += 1
                nfields = 1
                for i in range(line, line_end):
                    if data[i] == b'\t':
                        nfields += 1
                if nfields != natts:
                    raise sh.bad_snapshot(row, f"{nfields} fields for {natts} columns")
                values.len = 0
                field = line
                for i in range(natts):
                    field_end = field
                    while field_end < line_end and data[field_end] != b'\t':
                        field_end += 1
                    n = field_end - field
                    f = data + field
                    field = field_end + 1
                    if n == 2 and f[0] == b'\\' and f[1] == b'N':
                        cols.state[i] = ST_NULL
                    else:
                        cols.state[i] = ST_VALUE
                        cols.off[i] = values.len
                        unescape(&values, f, n, row, i)
                        cols.ln[i] = values.len - cols.off[i]
                        f = <const uint8_t *>values.data + cols.off[i]
                        n = cols.ln[i]
                        kind = rel.kinds[i]
                        if kind == 1:
                            if not is_integer(f, n):
                                raise sh.bad_snapshot(row, f"column {i} is not an integer")
                        elif kind == 2:
                            if not (n == 1 and (f[0] == b't' or f[0] == b'f')):
                                raise sh.bad_snapshot(row, f"column {i} is not a boolean")
                        elif utf8_invalid(f, n) >= 0:
                            raise sh.bad_snapshot(row, f"column {i} is not valid UTF-8")
                flags = 0
                buf_u64(&out, pos_value)
                buf_byte(&out, b'\t')
                buf_u64(&out, ordinal)
                buf_byte(&out, b'\t')
                put_time(&out, when)
                buf_byte(&out, b'\t')
                buf_bytes(&out, rel.ids)
                buf_put(&out, b"S\t", 2)
                k = out.len
                buf_put(&out, b"0000", 4)  # flags, written below
                buf_byte(&out, b'\t')
                buf_u64(&out, pos_value)
                buf_put(&out, b"\t\\N\t", 4)
                self._key(&out, rel, <const uint8_t *>values.data, cols, &flags)
                buf_byte(&out, b'\t')
                self._image(&out, rel, <const uint8_t *>values.data, cols, False, &flags)
                buf_put(&out, b"\t\\N\t\\N\t\\N\n", 10)
                # The flags are 0 or 8 (OVERSIZE): one digit; close the gap left for them.
                out.data[k] = <char>(48 + flags)
                memmove(out.data + k + 1, out.data + k + 4, out.len - k - 4)
                out.len -= 3
                ordinal += 1
                row += 1
                line = line_end + 1
            return PyBytes_FromStringAndSize(out.data, out.len), row
        finally:
            buf_free(&out)
            buf_free(&values)


cdef int unescape(Buf *b, const uint8_t *s, Py_ssize_t n, Py_ssize_t row, Py_ssize_t column) except -1:
    """Append a COPY text field with its backslash escapes resolved."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c
    cdef int value, digits
    buf_reserve(b, n)
    while i < n:
        c = s[i]
        i += 1
        if c != b'\\':
            b.data[b.len] = <char>c
            b.len += 1
            continue
        if i >= n:
            raise sh.bad_snapshot(row, f"column {column} ends with a lone backslash")
        c = s[i]
        i += 1
        if b'0' <= c <= b'7':
            value = c - 48
            digits = 1
            while digits < 3 and i < n and b'0' <= s[i] <= b'7':
                value = value * 8 + s[i] - 48
                i += 1
                digits += 1
            c = <uint8_t>(value & 0xFF)
        elif c == b'x' and i < n and hexval(s[i]) >= 0:
            value = hexval(s[i])
            i += 1
            if i < n and hexval(s[i]) >= 0:
                value = value * 16 + hexval(s[i])
                i += 1
            c = <uint8_t>value
        elif c == b'b':
            c = 8
        elif c == b'f':
            c = 12
        elif c == b'n':
            c = 10
        elif c == b'r':
            c = 13
        elif c == b't':
            c = 9
        elif c == b'v':
            c = 11
        b.data[b.len] = <char>c
        b.len += 1
    return 0


cdef inline int hexval(uint8_t c) noexcept:
    if b'0' <= c <= b'9':
        return c - 48
    if b'a' <= c <= b'f':
        return c - 87
    if b'A' <= c <= b'F':
        return c - 55
    return -1

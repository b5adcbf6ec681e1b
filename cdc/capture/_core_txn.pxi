# Included by _core.pyx: open transactions' buffered records (mirrors buffers.py). A record
# is a 14-byte little-endian header (length, subxid, flags, split) and the line's middle;
# chunks() adds position, ordinal, time and status once the transaction has finished.

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
    cdef int64_t last_sent  # sendTime of its latest Stream Start/Stop frame (MISSED: see model.py)

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
            buf_write(&self.mem, self.file)
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
                buf_write(&self.mem, self.file)
                buf_free(&self.mem)
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


# ---------------------------------------------------------------------------------------- records

cdef inline Py_ssize_t begin_record(_Txn txn, _Rel rel, char op) except -1:
    """Start a change's record (header space, ``table_id \\t schema_id \\t op``); its offset."""
    cdef Py_ssize_t start = txn.mem.len
    buf_reserve(&txn.mem, HEADER + PyBytes_GET_SIZE(rel.ids) + 1)
    txn.mem.len += HEADER
    buf_bytes(&txn.mem, rel.ids)
    buf_byte(&txn.mem, op)
    return start


cdef Py_ssize_t end_record(_Txn txn, Py_ssize_t start, Py_ssize_t split, uint32_t subxid, uint16_t flags,
                           int64_t table_id, char op, bint pending) except? -1:
    """Write the record's header and count the change; the bytes of memory it took (net of a
    flush to the spill file)."""
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
    if txn.file is not None and txn.mem.len >= SPILL_FLUSH:
        added -= txn.flush()
    return added


cdef Py_ssize_t spill_largest(list candidates, Py_ssize_t excess, Py_ssize_t *spilled) except -1:
    """Spill the largest in-memory transactions until ``excess`` bytes are freed (or none is
    left in memory); the bytes freed (``spilled``: how many spilled for the first time)."""
    cdef _Txn largest
    cdef _Txn txn
    cdef Py_ssize_t freed = 0
    while freed < excess and candidates:
        largest = candidates[0]
        for item in candidates:
            txn = item
            if txn.mem.len > largest.mem.len:
                largest = txn
        if not largest.mem.len:
            break
        if largest.file is None:
            spilled[0] += 1
        freed += largest.flush()
        candidates.remove(largest)
    return freed

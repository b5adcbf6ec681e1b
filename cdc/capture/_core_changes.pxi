# Included by _core.pyx: a change's COPY line middle written into its transaction's buffer
# (the Core's Insert, Update, Delete and Truncate; mirrors Core._insert ... in core.py).
# Everything is checked before the record starts; a failure while writing truncates it.

cdef inline int put_lsn_xid(_Txn txn, uint64_t lsn, uint32_t subxid) except -1:
    cdef Buf *m = &txn.mem
    buf_byte(m, b'\t')
    buf_u64(m, lsn)
    buf_byte(m, b'\t')
    if subxid == txn.xid:
        buf_put(m, b"\\N", 2)
    else:
        buf_u64(m, subxid)
    return buf_byte(m, b'\t')


cdef int change_insert(Core core, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                       uint32_t subxid, uint64_t lsn) except -1:
    cdef int tag = b'I'
    cdef _Rel rel
    cdef Py_ssize_t pos, start, split
    cdef int flags = 0
    need(p, size, off, 4, tag)
    rel = core._rel(txn, rd32(p + off), tag, lsn)
    if rel.ignored:
        return 0
    pos = off + 4
    need(p, size, pos, 1, tag)
    if p[pos] != b'N':
        err(tag, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
    pos = read_tuple(rel, p, size, pos + 1, tag, False, &core._new)
    end(size, pos, tag)
    start = begin_record(txn, rel, b'I')
    try:
        split = txn.mem.len - start - HEADER
        put_lsn_xid(txn, lsn, subxid)
        put_key(&txn.mem, rel, p, &core._new, &flags, core._max_value)
        buf_byte(&txn.mem, b'\t')
        put_image(&txn.mem, rel, p, &core._new, False, &flags, core._max_value, core._hash_value)
        buf_put(&txn.mem, b"\t\\N\t\\N\t\\N\n", 10)
    except BaseException:
        txn.mem.len = start
        raise
    return core._end_record(txn, start, split, subxid, flags, rel.table_id, b'I', False)


cdef int change_update(Core core, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                       uint32_t subxid, uint64_t lsn) except -1:
    cdef int tag = b'U'
    cdef _Rel rel
    cdef Py_ssize_t pos, start, split, key_start, key_len, i
    cdef int flags = 0
    cdef int old_flags = 0
    cdef uint8_t kind
    cdef bint has_old = False, full, has_key, has_old_key, pending = False
    cdef Cols *old = &core._old
    cdef Cols *new = &core._new
    need(p, size, off, 4, tag)
    rel = core._rel(txn, rd32(p + off), tag, lsn)
    if rel.ignored:
        return 0
    pos = off + 4
    need(p, size, pos, 1, tag)
    kind = p[pos]
    if kind == b'K' or kind == b'O':
        pos = read_tuple(rel, p, size, pos + 1, tag, True, old)
        has_old = True
        need(p, size, pos, 1, tag)
        if p[pos] != b'N':
            err(tag, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
    elif kind != b'N':
        err(tag, size, f"expected 'K', 'O' or 'N' at offset {pos}, got {kind:#04x}")
    pos = read_tuple(rel, p, size, pos + 1, tag, True, new)
    end(size, pos, tag)
    full = kind == b'O'
    if has_old:
        for i in range(rel.natts):
            if new.state[i] == ST_UNCHANGED and (full or rel.is_key[i]) and old.state[i] != ST_UNCHANGED:
                new.state[i] = old.state[i]
                new.off[i] = old.off[i]
                new.ln[i] = old.ln[i]
    start = begin_record(txn, rel, b'U')
    try:
        split = txn.mem.len - start - HEADER
        put_lsn_xid(txn, lsn, subxid)
        key_start = txn.mem.len
        has_key = put_key(&txn.mem, rel, p, new, &flags, core._max_value)
        key_len = txn.mem.len - key_start
        if not has_key:
            flags |= F_KEY_UNKNOWN
            buf_put(&txn.mem, b"\\N", 2)
        buf_byte(&txn.mem, b'\t')
        put_image(&txn.mem, rel, p, new, False, &flags, core._max_value, core._hash_value)
        buf_byte(&txn.mem, b'\t')
        if has_old and full:
            put_image(&txn.mem, rel, p, old, False, &flags, core._max_value, core._hash_value)
            flags |= F_BEFORE
        else:
            buf_put(&txn.mem, b"\\N", 2)
        buf_byte(&txn.mem, b'\t')
        has_old_key = False
        if has_old:
            core._scratch.len = 0
            if put_key(&core._scratch, rel, p, old, &old_flags, core._max_value):
                if not has_key or key_len != core._scratch.len or memcmp(
                        txn.mem.data + key_start, core._scratch.data, key_len) != 0:
                    has_old_key = True
                    flags |= old_flags
        if has_old_key:
            buf_put(&txn.mem, core._scratch.data, core._scratch.len)
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
    return core._end_record(txn, start, split, subxid, flags, rel.table_id, b'U', pending)


cdef int change_delete(Core core, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
                       uint32_t subxid, uint64_t lsn) except -1:
    cdef int tag = b'D'
    cdef _Rel rel
    cdef Py_ssize_t pos, start, split
    cdef int flags = 0
    cdef uint8_t kind
    cdef bint full
    need(p, size, off, 4, tag)
    rel = core._rel(txn, rd32(p + off), tag, lsn)
    if rel.ignored:
        return 0
    pos = off + 4
    need(p, size, pos, 1, tag)
    kind = p[pos]
    if kind != b'K' and kind != b'O':
        err(tag, size, f"expected 'K' or 'O' at offset {pos}, got {kind:#04x}")
    pos = read_tuple(rel, p, size, pos + 1, tag, True, &core._old)
    end(size, pos, tag)
    full = kind == b'O'
    start = begin_record(txn, rel, b'D')
    try:
        split = txn.mem.len - start - HEADER
        put_lsn_xid(txn, lsn, subxid)
        if not put_key(&txn.mem, rel, p, &core._old, &flags, core._max_value):
            flags |= F_KEY_UNKNOWN
            buf_put(&txn.mem, b"\\N", 2)
        buf_byte(&txn.mem, b'\t')
        put_image(&txn.mem, rel, p, &core._old, not full, &flags, core._max_value, core._hash_value)
        if full:
            flags |= F_BEFORE
        buf_put(&txn.mem, b"\t\\N\t\\N\t\\N\n", 10)
    except BaseException:
        txn.mem.len = start
        raise
    return core._end_record(txn, start, split, subxid, flags, rel.table_id, b'D', False)


cdef int change_truncate(Core core, _Txn txn, const uint8_t *p, Py_ssize_t size, Py_ssize_t off,
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
    rels = [core._rel(txn, rd32(p + pos + 4 * i), tag, lsn) for i in range(count)]
    for item in rels:
        rel = item
        if rel.ignored:
            continue
        start = begin_record(txn, rel, b'T')
        split = txn.mem.len - start - HEADER
        put_lsn_xid(txn, lsn, subxid)
        buf_put(&txn.mem, b"\\N\t\\N\t\\N\t\\N\t\\N\n", 15)
        core._end_record(txn, start, split, subxid, 0, rel.table_id, b'T', False)
    return 0

# Included by _core.pyx: C containers of the compiled capture core. A growable byte buffer
# (Buf), big-endian reads of the wire and little-endian record headers, the oid -> _Rel map
# (RelMap, open addressing, holding references) and the per-column scratch arrays (Cols).

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


cdef int buf_write(Buf *b, object file) except -1:
    """Write the buffer's bytes to ``file`` in 1 MiB slices, viewed in place (no copy of a
    buffer that may hold the whole memory limit)."""
    cdef Py_ssize_t pos = 0, n
    while pos < b.len:
        n = b.len - pos if b.len - pos < (1 << 20) else (1 << 20)
        view = PyMemoryView_FromMemory(b.data + pos, n, PyBUF_READ)
        try:
            file.write(view)
        finally:
            view.release()
        pos += n
    return 0


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


# ---------------------------------------------------------------------------------------- oid map

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


# ---------------------------------------------------------------------------------------- columns

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

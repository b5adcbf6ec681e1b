# Included by _core.pyx: reading pgoutput messages (mirrors pgoutput.py). Text checks, the
# bounds-checked reads and their errors (cold: raised through _shared, as core.py does), and
# TupleData, checked and located in place (no copy of a value).

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


# ---------------------------------------------------------------------------------------- tuples

cdef Py_ssize_t read_tuple(_Rel rel, const uint8_t *p, Py_ssize_t size, Py_ssize_t pos, int tag,
                           bint allow_u, Cols *cols) except -1:
    """Read TupleData at pos into cols (state, offset and length of each column's text, its
    kind checked); the offset after it."""
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

# Included by _core.pyx: encoding (mirrors images.py). JSON strings as escape_json writes
# them, times, per-relation texts (_Rel), key_text and images with column policies, and
# snapshot rows (COPY TO text fields) as `changes` lines.

# ---------------------------------------------------------------------------------------- values

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


# ---------------------------------------------------------------------------------------- relations

cdef class _Rel:
    # Made from a Relation message alone (info None, desc kept), it is described when the first
    # change using it arrives (Core._describe_rel): pgoutput sends Relation messages without a
    # position.
    cdef readonly object info
    cdef object desc
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
    cdef bint ignored  # changes of this relation are dropped (RelationInfo.ignored)
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
        self.ignored = bool(info.ignored)
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


# ---------------------------------------------------------------------------------------- keys and images

cdef int put_value(Buf *b, uint8_t kind, const uint8_t *s, Py_ssize_t n, bint key_form, int *flags,
                   Py_ssize_t max_value) except -1:
    """A value in JSON (oversize: its reference, and F_OVERSIZE in flags)."""
    if n > max_value:
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


cdef int put_key(Buf *b, _Rel rel, const uint8_t *base, Cols *c, int *flags, Py_ssize_t max_value) except -1:
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
            put_value(b, rel.kinds[i], base + c.off[i], c.ln[i], True, &local, max_value)
    buf_byte(b, b']')
    flags[0] |= local
    return 1


cdef int put_image(Buf *b, _Rel rel, const uint8_t *base, Cols *c, bint only_key, int *flags,
                   Py_ssize_t max_value, object hash_value) except -1:
    """The image (unchanged TOAST values left out, policies applied)."""
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
            buf_bytes(b, sh.hashed_json(hash_value, PyBytes_FromStringAndSize(<const char *>base + c.off[i], c.ln[i])))
        else:
            put_value(b, rel.kinds[i], base + c.off[i], c.ln[i], False, flags, max_value)
    return buf_byte(b, b'}')


# ---------------------------------------------------------------------------------------- snapshots

cdef snapshot_rows(info, copy_rows, position, first_ordinal, committed_at_us, Cols *cols,
                   Py_ssize_t max_value, hash_value):
    """COPY TO text rows of a table as `changes` lines of op S: (the lines, their count)."""
    cdef _Rel rel
    cdef Buf out
    cdef Buf values
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
    model.check_info(desc, info, hash_value is not None)
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
            put_key(&out, rel, <const uint8_t *>values.data, cols, &flags, max_value)
            buf_byte(&out, b'\t')
            put_image(&out, rel, <const uint8_t *>values.data, cols, False, &flags, max_value, hash_value)
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

/* Hot loops of the PostgreSQL and MySQL paths in C; each has a pure-Python twin that is used
 * when this module is not built, and tests check the two agree (tests/unit/
 * test_speedups.py).
 *
 *   tuple_at(buf, pos, unchanged) -> (values, end)
 *       pgoutput TupleData at buf[pos:]: a tuple of bytes (text values), None
 *       (NULL) or `unchanged` (TOAST value not sent), and the offset after it.
 *       Raises ValueError on anything malformed.
 *
 *   decode_rows(messages, unchanged) -> list
 *       pgoutput Insert, Update and Delete messages (bytes) as records
 *       (tag, relid, old, new): old and new as tuple_at gives them, or None when
 *       the message has none. Raises ValueError naming the index of the first
 *       message that is not such a message or is malformed.
 *
 *   copy_text(rows) -> bytes
 *       Rows (sequences of bytes or None) in COPY text format: fields separated
 *       by tabs, NULL as \N, backslash, tab, newline and carriage return escaped,
 *       each row ending in a newline.
 *
 *   take_packed(burst, start, relations, buf, runs, count) -> (int, int)
 *       The replication stream's CopyData payloads burst[start:] that are XLogData
 *       carrying an Insert, Update or Delete of a relation in `relations` (a dict
 *       relid -> object), up to the first that is not one (handled by the caller).
 *       Each message's bytes are appended to the bytearray `buf` as a msgpack bin
 *       (an element of the transaction's array of messages, encoded where it
 *       arrives: no object per row), and to the list `runs` a (relid << 8 | tag,
 *       relation, count) tuple whenever the relation or kind differs from the last
 *       run's (runs of one are the rule). `count` is the number of messages in
 *       `buf` so far. Returns the index of the first payload not taken (or
 *       len(burst)) and the new count.
 *
 *   read_copy(conn, getcopydata, freemem, limit, out) -> int
 *       Up to `limit` CopyData payloads (bytes) that libpq has already received on
 *       the PGconn at address `conn`, appended to `out`, through libpq's own
 *       PQgetCopyData (async) and PQfreemem at the addresses given (those of the
 *       libpq that made the connection). Never reads the socket. Returns the
 *       PQgetCopyData result that stopped it (0: nothing more buffered, -1: the
 *       copy ended, -2: an error) or 1 when `limit` was reached. The per-message
 *       call through psycopg cost ~1 us a row; this loop, ~0.1 us.
 *
 *   packed_copy(messages, relid, ncols, key_idx, kind) -> bytes | None
 *       COPY text (as copy_text writes it) of pgoutput Insert messages of relation
 *       `relid`, or, when `kind` (bytes) is given, of Inserts and Updates that carry
 *       only a new row, each followed by a `kind` field, every key (the values at
 *       `key_idx`) at most once. None when any message is anything else, has
 *       another relation, a row of other than `ncols` values, a value not sent
 *       (TOAST) or in binary, or is malformed; or, with `kind`, a key repeats.
 *
 *   my_decimal(buf, off, precision, scale) -> (Decimal, end) | None
 *       A MySQL binary DECIMAL(precision, scale) at buf[off:]. None when it runs
 *       past the end of buf, a digit group holds more digits than it may, or the
 *       precision and scale are not a DECIMAL's (the pure-Python reader then
 *       decides what that means).
 *
 *   my_datetime2(buf, off, fsp) -> (datetime | None, end) | None
 *       A MySQL DATETIME(fsp) (binlog type DATETIME2) at buf[off:]: the value, or
 *       None for a date that does not exist (zero dates: the caller's policy).
 *       None when it runs past the end of buf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

static PyObject *
malformed(void)
{
    PyErr_SetString(PyExc_ValueError, "malformed pgoutput TupleData");
    return NULL;
}

/* TupleData at buf[*pos]: a new tuple (and *pos moved past it), or NULL with
 * ValueError set. */
static PyObject *
parse_tuple(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *at, PyObject *unchanged)
{
    Py_ssize_t pos = *at;
    PyObject *values = NULL;
    if (pos < 0 || pos + 2 > len)
        return malformed();
    unsigned n = ((unsigned)buf[pos] << 8) | buf[pos + 1];
    if (n & 0x8000)
        return malformed();
    pos += 2;
    values = PyTuple_New(n);
    if (values == NULL)
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        if (pos >= len)
            goto bad;
        unsigned char kind = buf[pos];
        PyObject *v;
        if (kind == 't') {
            if (pos + 5 > len)
                goto bad;
            int32_t length = (int32_t)(((uint32_t)buf[pos + 1] << 24) |
                                       ((uint32_t)buf[pos + 2] << 16) |
                                       ((uint32_t)buf[pos + 3] << 8) | (uint32_t)buf[pos + 4]);
            Py_ssize_t start = pos + 5;
            if (length < 0 || (Py_ssize_t)length > len - start)
                goto bad;
            v = PyBytes_FromStringAndSize((const char *)buf + start, length);
            if (v == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            pos = start + length;
        }
        else if (kind == 'n') {
            v = Py_NewRef(Py_None);
            pos += 1;
        }
        else if (kind == 'u') {
            v = Py_NewRef(unchanged);
            pos += 1;
        }
        else
            goto bad;
        PyTuple_SET_ITEM(values, i, v);
    }
    *at = pos;
    return values;
bad:
    Py_DECREF(values);
    return malformed();
}

/* One Insert/Update/Delete message as (tag, relid, old, new), or NULL. */
static PyObject *
parse_row(const unsigned char *buf, Py_ssize_t len, PyObject *unchanged)
{
    if (len < 6)
        return NULL;
    unsigned char tag = buf[0], kind = buf[5];
    unsigned long relid = ((unsigned long)buf[1] << 24) | ((unsigned long)buf[2] << 16) |
                          ((unsigned long)buf[3] << 8) | (unsigned long)buf[4];
    PyObject *old = NULL, *new = NULL;
    Py_ssize_t pos = 6;
    if (tag == 'I' && kind == 'N') {
        new = parse_tuple(buf, len, &pos, unchanged);
    }
    else if (tag == 'U' && kind == 'N') {
        new = parse_tuple(buf, len, &pos, unchanged);
    }
    else if (tag == 'U' && (kind == 'K' || kind == 'O')) {
        old = parse_tuple(buf, len, &pos, unchanged);
        if (old == NULL)
            return NULL;
        if (pos >= len || buf[pos] != 'N') {
            Py_DECREF(old);
            return NULL;
        }
        pos += 1;
        new = parse_tuple(buf, len, &pos, unchanged);
        if (new == NULL) {
            Py_DECREF(old);
            return NULL;
        }
    }
    else if (tag == 'D' && (kind == 'K' || kind == 'O')) {
        old = parse_tuple(buf, len, &pos, unchanged);
        if (old == NULL)
            return NULL;
    }
    else
        return NULL;
    if ((new == NULL && old == NULL) || pos != len) {
        Py_XDECREF(old);
        Py_XDECREF(new);
        return NULL;
    }
    return Py_BuildValue("(ikNN)", (int)tag, relid, old ? old : Py_NewRef(Py_None),
                         new ? new : Py_NewRef(Py_None));
}

static PyObject *
decode_rows(PyObject *self, PyObject *args)
{
    PyObject *messages, *unchanged;
    if (!PyArg_ParseTuple(args, "OO", &messages, &unchanged))
        return NULL;
    PyObject *seq = PySequence_Fast(messages, "decode_rows() takes a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *m = items[i];
        PyObject *rec = NULL;
        if (PyBytes_Check(m))
            rec = parse_row((const unsigned char *)PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m),
                            unchanged);
        if (rec == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "message %zd is not a well-formed row change", i);
            goto fail;
        }
        PyList_SET_ITEM(out, i, rec);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
tuple_at(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    PyObject *unchanged;
    if (!PyArg_ParseTuple(args, "y*nO", &view, &pos, &unchanged))
        return NULL;
    PyObject *values = parse_tuple((const unsigned char *)view.buf, view.len, &pos, unchanged);
    PyObject *result = values ? Py_BuildValue("(Nn)", values, pos) : NULL;
    PyBuffer_Release(&view);
    return result;
}

static Py_ssize_t
escaped_size(const char *s, Py_ssize_t n)
{
    Py_ssize_t extra = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\\' || c == '\t' || c == '\n' || c == '\r')
            extra++;
    }
    return n + extra;
}

static char *
write_escaped(char *out, const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        switch (c) {
        case '\\': *out++ = '\\'; *out++ = '\\'; break;
        case '\t': *out++ = '\\'; *out++ = 't'; break;
        case '\n': *out++ = '\\'; *out++ = 'n'; break;
        case '\r': *out++ = '\\'; *out++ = 'r'; break;
        default: *out++ = c;
        }
    }
    return out;
}

static PyObject *
copy_text(PyObject *self, PyObject *arg)
{
    PyObject *rows = PySequence_Fast(arg, "copy_text() takes a sequence of rows");
    if (rows == NULL)
        return NULL;
    Py_ssize_t nrows = PySequence_Fast_GET_SIZE(rows);
    PyObject **rowv = PySequence_Fast_ITEMS(rows);
    PyObject **fast = PyMem_Calloc(nrows ? nrows : 1, sizeof(PyObject *));
    PyObject *result = NULL;
    if (fast == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t r = 0; r < nrows; r++) {
        fast[r] = PySequence_Fast(rowv[r], "copy_text(): a row is not a sequence");
        if (fast[r] == NULL)
            goto done;
        Py_ssize_t nf = PySequence_Fast_GET_SIZE(fast[r]);
        PyObject **fv = PySequence_Fast_ITEMS(fast[r]);
        total += nf ? nf : 1; /* separators and the newline */
        for (Py_ssize_t f = 0; f < nf; f++) {
            PyObject *v = fv[f];
            if (v == Py_None)
                total += 2;
            else if (PyBytes_Check(v))
                total += escaped_size(PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
            else {
                PyErr_Format(PyExc_TypeError, "copy_text(): a value is %.100s, not bytes",
                             Py_TYPE(v)->tp_name);
                goto done;
            }
        }
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(result);
    for (Py_ssize_t r = 0; r < nrows; r++) {
        Py_ssize_t nf = PySequence_Fast_GET_SIZE(fast[r]);
        PyObject **fv = PySequence_Fast_ITEMS(fast[r]);
        for (Py_ssize_t f = 0; f < nf; f++) {
            if (f)
                *out++ = '\t';
            PyObject *v = fv[f];
            if (v == Py_None) {
                *out++ = '\\';
                *out++ = 'N';
            }
            else
                out = write_escaped(out, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
        }
        *out++ = '\n';
    }
done:
    if (fast != NULL) {
        for (Py_ssize_t r = 0; r < nrows; r++)
            Py_XDECREF(fast[r]);
        PyMem_Free(fast);
    }
    Py_DECREF(rows);
    return result;
}

static PyObject *
take_packed(PyObject *self, PyObject *args)
{
    PyObject *burst, *relations, *buf, *runs;
    Py_ssize_t i, count;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!n:take_packed", &PyList_Type, &burst, &i,
                          &PyDict_Type, &relations, &PyByteArray_Type, &buf, &PyList_Type,
                          &runs, &count))
        return NULL;
    if (i < 0)
        i = 0;
    unsigned long last_tally = 0;
    int have_run = 0;
    Py_ssize_t nruns = PyList_GET_SIZE(runs);
    if (nruns > 0) {
        PyObject *last = PyList_GET_ITEM(runs, nruns - 1);
        if (!PyTuple_Check(last) || PyTuple_GET_SIZE(last) != 3) {
            PyErr_SetString(PyExc_TypeError, "take_packed(): runs hold (tally, relation, start)");
            return NULL;
        }
        last_tally = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(last, 0));
        if (last_tally == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        have_run = 1;
    }
    /* The bytearray grows by doubling here and is cut to its exact length at the end
       (bytearray's own growth is 1/8: a realloc every few rows of a large transaction). */
    Py_ssize_t used = PyByteArray_GET_SIZE(buf);
    unsigned long last_relid = 0;
    PyObject *rel = NULL; /* owned */
    PyObject *result = NULL;
    for (; i < PyList_GET_SIZE(burst); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(burst, i), &view, PyBUF_SIMPLE) < 0)
            goto done;
        const unsigned char *b = view.buf;
        unsigned char tag = view.len >= 30 ? b[25] : 0;
        if (view.len < 30 || b[0] != 'w' || (tag != 'I' && tag != 'U' && tag != 'D')) {
            PyBuffer_Release(&view);
            break;
        }
        unsigned long relid = ((unsigned long)b[26] << 24) | ((unsigned long)b[27] << 16) |
                              ((unsigned long)b[28] << 8) | (unsigned long)b[29];
        if (rel == NULL || relid != last_relid) {
            PyObject *key = PyLong_FromUnsignedLong(relid);
            if (key == NULL) {
                PyBuffer_Release(&view);
                goto done;
            }
            PyObject *found = PyDict_GetItemWithError(relations, key); /* borrowed */
            Py_DECREF(key);
            if (found == NULL) {
                PyBuffer_Release(&view);
                if (PyErr_Occurred())
                    goto done;
                break;
            }
            Py_INCREF(found);
            Py_XSETREF(rel, found);
            last_relid = relid;
        }
        unsigned long tv = (relid << 8) | tag;
        if (!have_run || tv != last_tally) {
            PyObject *run = Py_BuildValue("(kOn)", tv, rel, count);
            int failed = run == NULL || PyList_Append(runs, run) < 0;
            Py_XDECREF(run);
            if (failed) {
                PyBuffer_Release(&view);
                goto done;
            }
            last_tally = tv;
            have_run = 1;
        }
        Py_ssize_t m = view.len - 25;
        Py_ssize_t hdr = m < 256 ? 2 : (m < 65536 ? 3 : 5);
        if (m > 0xFFFFFFFFLL) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "take_packed(): message over 4 GB");
            goto done;
        }
        if (used + hdr + m > PyByteArray_GET_SIZE(buf)) {
            Py_ssize_t want = PyByteArray_GET_SIZE(buf) * 2;
            if (want < used + hdr + m)
                want = used + hdr + m;
            if (want < 65536)
                want = 65536;
            if (PyByteArray_Resize(buf, want) < 0) {
                PyBuffer_Release(&view);
                goto done;
            }
        }
        unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(buf) + used;
        if (hdr == 2) {
            out[0] = 0xc4;
            out[1] = (unsigned char)m;
        }
        else if (hdr == 3) {
            out[0] = 0xc5;
            out[1] = (unsigned char)(m >> 8);
            out[2] = (unsigned char)m;
        }
        else {
            out[0] = 0xc6;
            out[1] = (unsigned char)(m >> 24);
            out[2] = (unsigned char)(m >> 16);
            out[3] = (unsigned char)(m >> 8);
            out[4] = (unsigned char)m;
        }
        memcpy(out + hdr, b + 25, (size_t)m);
        PyBuffer_Release(&view);
        used += hdr + m;
        count++;
    }
    result = Py_BuildValue("(nn)", i, count);
done:
    Py_XDECREF(rel);
    /* Exact length, also on failure: what was appended before it stays whole. */
    if (PyByteArray_GET_SIZE(buf) != used && PyByteArray_Resize(buf, used) < 0)
        Py_CLEAR(result);
    return result;
}

typedef int (*getcopydata_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);

static PyObject *
read_copy(PyObject *self, PyObject *args)
{
    unsigned long long conn, get_addr, free_addr;
    Py_ssize_t limit;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "KKKnO!:read_copy", &conn, &get_addr, &free_addr, &limit,
                          &PyList_Type, &out))
        return NULL;
    if (conn == 0 || get_addr == 0 || free_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "read_copy(): null connection or function");
        return NULL;
    }
    getcopydata_fn get = (getcopydata_fn)(uintptr_t)get_addr;
    freemem_fn release = (freemem_fn)(uintptr_t)free_addr;
    int rv = 1;
    for (Py_ssize_t n = 0; n < limit; n++) {
        char *buf = NULL;
        rv = get((void *)(uintptr_t)conn, &buf, 1);
        if (rv <= 0) {
            if (buf != NULL)
                release(buf);
            break;
        }
        PyObject *b = PyBytes_FromStringAndSize(buf, rv);
        release(buf);
        if (b == NULL)
            return NULL;
        int failed = PyList_Append(out, b);
        Py_DECREF(b);
        if (failed)
            return NULL;
        rv = 1;
    }
    return PyLong_FromLong(rv);
}

/* Growing output buffer of packed_copy. */
typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} outbuf;

static int
out_reserve(outbuf *o, Py_ssize_t more)
{
    if (o->len + more <= o->cap)
        return 1;
    Py_ssize_t cap = o->cap ? o->cap : 65536;
    while (cap < o->len + more)
        cap *= 2;
    char *b = PyMem_Realloc(o->buf, (size_t)cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    o->buf = b;
    o->cap = cap;
    return 1;
}

static PyObject *
packed_copy(PyObject *self, PyObject *args)
{
    PyObject *messages, *key_idx, *kind;
    unsigned long relid;
    Py_ssize_t ncols;
    if (!PyArg_ParseTuple(args, "OknO!O:packed_copy", &messages, &relid, &ncols, &PyTuple_Type,
                          &key_idx, &kind))
        return NULL;
    if (kind != Py_None && !PyBytes_Check(kind)) {
        PyErr_SetString(PyExc_TypeError, "packed_copy(): kind must be bytes or None");
        return NULL;
    }
    Py_ssize_t nkeys = PyTuple_GET_SIZE(key_idx);
    Py_ssize_t *keys = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(nkeys ? nkeys : 1));
    if (keys == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        keys[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(key_idx, k));
        if (keys[k] == -1 && PyErr_Occurred()) {
            PyMem_Free(keys);
            return NULL;
        }
    }
    PyObject *fast = PySequence_Fast(messages, "packed_copy(): messages must be a sequence");
    if (fast == NULL) {
        PyMem_Free(keys);
        return NULL;
    }
    /* (start, length) of each value of the current row; length -1 for NULL */
    Py_ssize_t *spans = PyMem_Malloc(sizeof(Py_ssize_t) * 2 * (size_t)(ncols > 0 ? ncols : 1));
    PyObject *seen = kind != Py_None ? PySet_New(NULL) : NULL;
    outbuf o = {NULL, 0, 0};
    PyObject *result = NULL;
    int bad = 0;
    if (spans == NULL || (kind != Py_None && seen == NULL))
        goto fail;
    bad = ncols <= 0 || ncols > 0x7FFF;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t m = 0; m < n && !bad; m++) {
        if (!PyBytes_Check(items[m])) {
            bad = 1;
            break;
        }
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(items[m]);
        Py_ssize_t len = PyBytes_GET_SIZE(items[m]);
        if (len < 8 || !(b[0] == 'I' || (b[0] == 'U' && kind != Py_None)) || b[5] != 'N') {
            bad = 1;
            break;
        }
        unsigned long r = ((unsigned long)b[1] << 24) | ((unsigned long)b[2] << 16) |
                          ((unsigned long)b[3] << 8) | (unsigned long)b[4];
        Py_ssize_t cols = ((Py_ssize_t)b[6] << 8) | b[7];
        if (r != relid || cols != ncols) {
            bad = 1;
            break;
        }
        Py_ssize_t pos = 8, need = 1 + (kind != Py_None ? 1 + PyBytes_GET_SIZE(kind) : 0);
        for (Py_ssize_t c = 0; c < ncols; c++) {
            if (pos >= len) {
                bad = 1;
                break;
            }
            if (b[pos] == 'n') {
                spans[2 * c] = pos + 1;
                spans[2 * c + 1] = -1;
                pos += 1;
                need += 3;
                continue;
            }
            if (b[pos] != 't' || pos + 5 > len) {
                bad = 1; /* 'u' (TOAST not sent), 'b' (binary), or junk */
                break;
            }
            int32_t vl = (int32_t)(((uint32_t)b[pos + 1] << 24) | ((uint32_t)b[pos + 2] << 16) |
                                   ((uint32_t)b[pos + 3] << 8) | (uint32_t)b[pos + 4]);
            if (vl < 0 || pos + 5 + vl > len) {
                bad = 1;
                break;
            }
            spans[2 * c] = pos + 5;
            spans[2 * c + 1] = vl;
            pos += 5 + vl;
            need += 1 + escaped_size((const char *)b + spans[2 * c], vl);
        }
        if (bad || pos != len) {
            bad = 1;
            break;
        }
        if (seen != NULL) {
            /* the key as (length, bytes) of each of its values: no two keys alike */
            Py_ssize_t klen = 0;
            for (Py_ssize_t k = 0; k < nkeys; k++) {
                if (keys[k] < 0 || keys[k] >= ncols) {
                    bad = 1;
                    break;
                }
                klen += 4 + (spans[2 * keys[k] + 1] > 0 ? spans[2 * keys[k] + 1] : 0);
            }
            if (bad)
                break;
            PyObject *kb = PyBytes_FromStringAndSize(NULL, klen);
            if (kb == NULL)
                goto fail;
            char *kp = PyBytes_AS_STRING(kb);
            for (Py_ssize_t k = 0; k < nkeys; k++) {
                Py_ssize_t vl = spans[2 * keys[k] + 1];
                uint32_t u = (uint32_t)vl; /* -1 (NULL) stays distinct from "" */
                kp[0] = (char)(u >> 24);
                kp[1] = (char)(u >> 16);
                kp[2] = (char)(u >> 8);
                kp[3] = (char)u;
                kp += 4;
                if (vl > 0) {
                    memcpy(kp, b + spans[2 * keys[k]], (size_t)vl);
                    kp += vl;
                }
            }
            int had = PySet_Contains(seen, kb);
            if (had == 0)
                had = PySet_Add(seen, kb) < 0 ? -1 : 0;
            Py_DECREF(kb);
            if (had < 0)
                goto fail;
            if (had == 1) {
                bad = 1;
                break;
            }
        }
        if (!out_reserve(&o, need))
            goto fail;
        char *w = o.buf + o.len;
        for (Py_ssize_t c = 0; c < ncols; c++) {
            if (c)
                *w++ = '\t';
            if (spans[2 * c + 1] < 0) {
                *w++ = '\\';
                *w++ = 'N';
            }
            else
                w = write_escaped(w, (const char *)b + spans[2 * c], spans[2 * c + 1]);
        }
        if (kind != Py_None) {
            *w++ = '\t';
            memcpy(w, PyBytes_AS_STRING(kind), (size_t)PyBytes_GET_SIZE(kind));
            w += PyBytes_GET_SIZE(kind);
        }
        *w++ = '\n';
        o.len = w - o.buf;
    }
    result = bad ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize(o.buf ? o.buf : "", o.len);
fail:
    PyMem_Free(o.buf);
    PyMem_Free(spans);
    PyMem_Free(keys);
    Py_XDECREF(seen);
    Py_DECREF(fast);
    if (result == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    return result;
}

static const int dig2bytes[10] = {0, 1, 1, 2, 2, 3, 3, 4, 4, 4};
static const uint32_t pow10s[10] = {1,      10,      100,      1000,      10000,
                                    100000, 1000000, 10000000, 100000000, 1000000000};
static PyObject *decimal_type = NULL;

/* One digit group of `nbytes` big-endian bytes, written as exactly `digits`
 * decimal digits; 0 when the value does not fit. */
static int
put_group(const unsigned char *g, int nbytes, int digits, char **out)
{
    uint32_t v = 0;
    for (int i = 0; i < nbytes; i++)
        v = (v << 8) | g[i];
    if (v >= pow10s[digits])
        return 0;
    for (int i = digits - 1; i >= 0; i--) {
        (*out)[i] = (char)('0' + v % 10);
        v /= 10;
    }
    *out += digits;
    return 1;
}

static PyObject *
my_decimal(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    int precision, scale;
    if (!PyArg_ParseTuple(args, "y*nii:my_decimal", &view, &off, &precision, &scale))
        return NULL;
    PyObject *result = NULL;
    if (precision < 1 || precision > 65 || scale < 0 || scale > precision) {
        result = Py_NewRef(Py_None); /* not a layout MySQL makes: the Python reader's */
        goto done;
    }
    int intg = precision - scale;
    int intg0 = intg / 9, intg0x = intg % 9, frac0 = scale / 9, frac0x = scale % 9;
    Py_ssize_t size = dig2bytes[intg0x] + intg0 * 4 + frac0 * 4 + dig2bytes[frac0x];
    if (off < 0 || off > view.len || size > view.len - off) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* The sign is the top bit (set: positive); negatives are stored inverted. */
    unsigned char d[64];
    memcpy(d, (const unsigned char *)view.buf + off, (size_t)size);
    int negative = !(d[0] & 0x80);
    d[0] ^= 0x80;
    if (negative)
        for (Py_ssize_t i = 0; i < size; i++)
            d[i] ^= 0xFF;
    /* sign, a "0" when there is no integer part, 65 digits, the point */
    char text[2 + 65 + 1 + 1];
    char *out = text + 2;
    const unsigned char *g = d;
    int ok = 1;
    if (intg0x) {
        ok = put_group(g, dig2bytes[intg0x], intg0x, &out);
        g += dig2bytes[intg0x];
    }
    for (int i = 0; ok && i < intg0; i++, g += 4)
        ok = put_group(g, 4, 9, &out);
    /* The integer part as str(int) writes it: no leading zeros, "0" when zero. */
    char *start = text + 2;
    while (start < out && *start == '0')
        start++;
    if (start == out)
        *--start = '0';
    if (negative)
        *--start = '-';
    if (ok && scale) {
        *out++ = '.';
        for (int i = 0; ok && i < frac0; i++, g += 4)
            ok = put_group(g, 4, 9, &out);
        if (ok && frac0x)
            ok = put_group(g, dig2bytes[frac0x], frac0x, &out);
    }
    if (!ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (decimal_type == NULL) {
        PyObject *mod = PyImport_ImportModule("decimal");
        if (mod == NULL)
            goto done;
        decimal_type = PyObject_GetAttrString(mod, "Decimal");
        Py_DECREF(mod);
        if (decimal_type == NULL)
            goto done;
    }
    PyObject *str = PyUnicode_FromStringAndSize(start, out - start);
    if (str == NULL)
        goto done;
    PyObject *value = PyObject_CallOneArg(decimal_type, str);
    Py_DECREF(str);
    if (value == NULL)
        goto done;
    result = Py_BuildValue("(Nn)", value, off + size);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
my_datetime2(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    int fsp;
    if (!PyArg_ParseTuple(args, "y*ni:my_datetime2", &view, &off, &fsp))
        return NULL;
    PyObject *result = NULL;
    if (fsp < 0 || fsp > 6) {
        PyErr_SetString(PyExc_ValueError, "my_datetime2(): bad fractional-second precision");
        goto done;
    }
    int nfrac = (fsp + 1) / 2;
    static const long mult[4] = {1, 10000, 100, 1};
    Py_ssize_t size = 5 + nfrac;
    if (off < 0 || off > view.len || size > view.len - off) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const unsigned char *b = (const unsigned char *)view.buf + off;
    int64_t raw = 0;
    for (int i = 0; i < 5; i++)
        raw = (raw << 8) | b[i];
    int64_t v = raw - INT64_C(0x8000000000);
    long us = 0;
    for (int i = 0; i < nfrac; i++)
        us = (us << 8) | b[5 + i];
    us *= mult[nfrac];
    PyObject *value = NULL;
    if (v >= 0) {
        int64_t ymd = v >> 17, ym = ymd >> 5, hms = v & 0x1FFFF;
        int year = (int)(ym / 13), month = (int)(ym % 13), day = (int)(ymd & 31);
        int hour = (int)(hms >> 12), minute = (int)((hms >> 6) & 63), second = (int)(hms & 63);
        /* what datetime() accepts; anything else is the caller's zero date */
        static const int mdays[13] = {0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
        int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        if (year >= 1 && year <= 9999 && month >= 1 && day >= 1 &&
            day <= (month == 2 && !leap ? 28 : mdays[month]) && hour < 24 && minute < 60 &&
            second < 60 && us < 1000000) {
            value = PyDateTime_FromDateAndTime(year, month, day, hour, minute, second, (int)us);
            if (value == NULL)
                goto done;
        }
    }
    if (value == NULL)
        value = Py_NewRef(Py_None);
    result = Py_BuildValue("(Nn)", value, off + size);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"tuple_at", tuple_at, METH_VARARGS, "pgoutput TupleData at an offset"},
    {"copy_text", copy_text, METH_O, "rows in COPY text format"},
    {"decode_rows", decode_rows, METH_VARARGS, "pgoutput row changes as records"},
    {"take_packed", take_packed, METH_VARARGS, "row-change XLogData of a burst, as msgpack"},
    {"read_copy", read_copy, METH_VARARGS, "CopyData payloads libpq has buffered"},
    {"packed_copy", packed_copy, METH_VARARGS, "COPY text of pgoutput row messages"},
    {"my_decimal", my_decimal, METH_VARARGS, "a MySQL binary DECIMAL"},
    {"my_datetime2", my_datetime2, METH_VARARGS, "a MySQL DATETIME2"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C twins of the PostgreSQL path's hot loops.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL)
        return NULL;
    return PyModule_Create(&module);
}

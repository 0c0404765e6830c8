/* Hot loops of the PostgreSQL path in C; each has a pure-Python twin that is used
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
 *   take_rows(burst, start, relations, out, extra) -> int
 *       The replication stream's CopyData payloads burst[start:] that are XLogData
 *       carrying an Insert, Update or Delete of a relation in `relations` (a dict
 *       relid -> object), appended to `out` as (tag, relation, relid, message
 *       bytes, extra) until the first that is not one (handled by the caller):
 *       its index, or len(burst).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
take_rows(PyObject *self, PyObject *args)
{
    PyObject *burst, *relations, *out, *extra;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O!nO!O!O:take_rows", &PyList_Type, &burst, &i, &PyDict_Type,
                          &relations, &PyList_Type, &out, &extra))
        return NULL;
    if (i < 0)
        i = 0;
    for (; i < PyList_GET_SIZE(burst); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(burst, i), &view, PyBUF_SIMPLE) < 0)
            return NULL;
        const unsigned char *b = view.buf;
        unsigned char tag = view.len >= 30 ? b[25] : 0;
        if (view.len < 30 || b[0] != 'w' || (tag != 'I' && tag != 'U' && tag != 'D')) {
            PyBuffer_Release(&view);
            break;
        }
        unsigned long relid = ((unsigned long)b[26] << 24) | ((unsigned long)b[27] << 16) |
                              ((unsigned long)b[28] << 8) | (unsigned long)b[29];
        PyObject *key = PyLong_FromUnsignedLong(relid);
        if (key == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
        PyObject *rel = PyDict_GetItemWithError(relations, key); /* borrowed */
        if (rel == NULL) {
            Py_DECREF(key);
            PyBuffer_Release(&view);
            if (PyErr_Occurred())
                return NULL;
            break;
        }
        PyObject *msg = PyBytes_FromStringAndSize((const char *)b + 25, view.len - 25);
        PyBuffer_Release(&view);
        PyObject *tagv = msg ? PyLong_FromLong(tag) : NULL;
        PyObject *rec = tagv ? PyTuple_Pack(5, tagv, rel, key, msg, extra) : NULL;
        Py_XDECREF(tagv);
        Py_XDECREF(msg);
        Py_DECREF(key);
        if (rec == NULL)
            return NULL;
        int failed = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (failed)
            return NULL;
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"tuple_at", tuple_at, METH_VARARGS, "pgoutput TupleData at an offset"},
    {"copy_text", copy_text, METH_O, "rows in COPY text format"},
    {"decode_rows", decode_rows, METH_VARARGS, "pgoutput row changes as records"},
    {"take_rows", take_rows, METH_VARARGS, "row-change XLogData of a burst, kept as bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C twins of the PostgreSQL path's hot loops.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}

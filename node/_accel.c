/* node._accel: the per-entry work of applying replicated entries, in C.

   `replica_parts` takes the entries of a pull reply as msgpack decoded them (dicts) and, when
   every one of them is the plain case, returns what `Ledger.apply_replicated` would compute
   from them in Python: the leaf hashes' pre-images (hashed by the caller with hashlib), the
   hashes the entries carry, their keys, their canonical encodings (byte for byte those of
   `protocol.entry.encode_entry_parts`), the largest and the last lamport. Anything unusual (a
   missing or mistyped field, a seq out of turn, another context or writer, a non-ASCII or long
   key, metadata, a value out of bounds) returns None, and the caller takes the pure-Python path,
   which words the error. So this module decides nothing the Python code does not: it is only
   faster (and optional: without a C compiler the node runs the same without it). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_KEY_BYTES 256
#define MAX_CONTEXT_BYTES 256
#define MAX_WRITER_BYTES 64
#define MAX_LAMPORT 0x7fffffffffffffffULL

static PyObject *k_context, *k_seq, *k_key, *k_payload, *k_metadata, *k_lamport, *k_ts_ns, *k_writer, *k_hash;

static inline unsigned char *put_be(unsigned char *p, unsigned long long v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    return p + n;
}

/* msgpack's shortest form of an unsigned integer, as msgpack-python packs it */
static inline unsigned char *put_uint(unsigned char *p, unsigned long long v) {
    if (v < 0x80) {
        *p++ = (unsigned char)v;
    } else if (v <= 0xff) {
        *p++ = 0xcc;
        *p++ = (unsigned char)v;
    } else if (v <= 0xffff) {
        *p++ = 0xcd;
        p = put_be(p, v, 2);
    } else if (v <= 0xffffffffULL) {
        *p++ = 0xce;
        p = put_be(p, v, 4);
    } else {
        *p++ = 0xcf;
        p = put_be(p, v, 8);
    }
    return p;
}

/* `n` bytes after the header of the shortest of three sizes (8-, 16-, 32-bit length) */
static inline unsigned char *put_sized(unsigned char *p, const char *s, Py_ssize_t n, unsigned char h8,
                                       unsigned char h16, unsigned char h32) {
    if (n < 0x100) {
        *p++ = h8;
        *p++ = (unsigned char)n;
    } else if (n < 0x10000) {
        *p++ = h16;
        p = put_be(p, (unsigned long long)n, 2);
    } else {
        *p++ = h32;
        p = put_be(p, (unsigned long long)n, 4);
    }
    memcpy(p, s, (size_t)n);
    return p + n;
}

/* a str (use_bin_type=True: str8 exists) */
static inline unsigned char *put_str(unsigned char *p, const char *s, Py_ssize_t n) {
    if (n < 32) {
        *p++ = (unsigned char)(0xa0 | n);
        memcpy(p, s, (size_t)n);
        return p + n;
    }
    return put_sized(p, s, n, 0xd9, 0xda, 0xdb);
}

static inline unsigned char *put_bin(unsigned char *p, const char *s, Py_ssize_t n) {
    return put_sized(p, s, n, 0xc4, 0xc5, 0xc6);
}

static inline unsigned char *put_raw(unsigned char *p, const char *s, size_t n) {
    memcpy(p, s, n);
    return p + n;
}

/* an exact int in 0 .. 2^64-1, else -1 (no exception left set) */
static inline int as_u64(PyObject *o, unsigned long long *out) {
    if (!PyLong_CheckExact(o)) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or too large */
        return -1;
    }
    *out = v;
    return 0;
}

/* the leaf hash's pre-image (protocol.entry.leaf_hash_named, no metadata): LEAF_PREFIX, seq,
   lamport, ts_ns as u64, the context's and writer's names as the caller laid them out, then the
   key, an empty metadata count and the payload, each length-prefixed (u32) */
static PyObject *preimage(unsigned long long seq, unsigned long long lamport, unsigned long long ts,
                          const char *names, Py_ssize_t names_n, const char *key, unsigned long long key_n,
                          const char *payload, unsigned long long payload_n) {
    PyObject *pi = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(1 + 24 + names_n + 4 + key_n + 4 + 4 + payload_n));
    if (pi == NULL) {
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(pi);
    *p++ = 0x00;
    p = put_be(p, seq, 8);
    p = put_be(p, lamport, 8);
    p = put_be(p, ts, 8);
    p = put_raw(p, names, (size_t)names_n);
    p = put_be(p, key_n, 4);
    p = put_raw(p, key, (size_t)key_n);
    p = put_be(p, 0, 4);
    p = put_be(p, payload_n, 4);
    put_raw(p, payload, (size_t)payload_n);
    return pi;
}

static inline PyObject *item(PyObject *m, PyObject *k) {
    return PyDict_GetItemWithError(m, k); /* borrowed; NULL when missing (or an error) */
}

static PyObject *fail(PyObject *a, PyObject *b, PyObject *c, PyObject *d) {
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(d);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* replica_parts(maps, first_seq, context, writer, names, context_packed, writer_packed)
   -> (preimages, hashes, keys, blobs, max_lamport, last_lamport) or None */
static PyObject *replica_parts(PyObject *self, PyObject *args) {
    PyObject *maps, *first_obj, *context, *writer;
    const char *names, *cp, *wp;
    Py_ssize_t names_n, cp_n, wp_n;
    if (!PyArg_ParseTuple(args, "O!OUUy#y#y#", &PyList_Type, &maps, &first_obj, &context, &writer, &names,
                          &names_n, &cp, &cp_n, &wp, &wp_n)) {
        return NULL;
    }
    unsigned long long seq;
    if (as_u64(first_obj, &seq) < 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(maps);
    PyObject *pre = PyList_New(n), *hashes = PyList_New(n), *keys = PyList_New(n), *blobs = PyList_New(n);
    if (pre == NULL || hashes == NULL || keys == NULL || blobs == NULL) {
        return fail(pre, hashes, keys, blobs);
    }
    unsigned long long max_lamport = 0, lamport = 0;
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        PyObject *m = PyList_GET_ITEM(maps, i);
        if (!PyDict_CheckExact(m) || PyDict_GET_SIZE(m) < 9 || seq == 0) {
            return fail(pre, hashes, keys, blobs);
        }
        PyObject *c = item(m, k_context), *s = item(m, k_seq), *k = item(m, k_key), *pl = item(m, k_payload),
                 *md = item(m, k_metadata), *lo = item(m, k_lamport), *ts = item(m, k_ts_ns), *w = item(m, k_writer),
                 *h = item(m, k_hash);
        if (!c || !s || !k || !pl || !md || !lo || !ts || !w || !h) {
            return fail(pre, hashes, keys, blobs);
        }
        unsigned long long s_v, ts_v;
        if (as_u64(s, &s_v) < 0 || s_v != seq || as_u64(lo, &lamport) < 0 || lamport > MAX_LAMPORT ||
            as_u64(ts, &ts_v) < 0) {
            return fail(pre, hashes, keys, blobs);
        }
        if (!PyBytes_CheckExact(pl) || !PyBytes_CheckExact(h) || PyBytes_GET_SIZE(h) != 32 ||
            !PyDict_CheckExact(md) || PyDict_GET_SIZE(md) != 0 || !PyUnicode_CheckExact(k) ||
            !PyUnicode_IS_READY(k) || !PyUnicode_IS_ASCII(k) || PyUnicode_GET_LENGTH(k) > MAX_KEY_BYTES ||
            !PyUnicode_CheckExact(c) || !PyUnicode_CheckExact(w)) {
            return fail(pre, hashes, keys, blobs);
        }
        int same = PyUnicode_Compare(c, context);
        if (same == 0) {
            same = PyUnicode_Compare(w, writer);
        }
        if (same != 0) {
            return fail(pre, hashes, keys, blobs); /* (or a comparison error, raised) */
        }
        const char *kb = (const char *)PyUnicode_DATA(k);
        Py_ssize_t kn = PyUnicode_GET_LENGTH(k);
        const char *pb = PyBytes_AS_STRING(pl);
        Py_ssize_t pn = PyBytes_GET_SIZE(pl);
        if (pn > 0xffffffffLL) {
            return fail(pre, hashes, keys, blobs);
        }

        PyObject *pi = preimage(seq, lamport, ts_v, names, names_n, kb, (unsigned long long)kn, pb,
                                (unsigned long long)pn);
        if (pi == NULL) {
            return fail(pre, hashes, keys, blobs);
        }
        PyList_SET_ITEM(pre, i, pi);

        /* the canonical map (protocol.entry.encode_entry_parts): at most this many bytes */
        Py_ssize_t cap = 160 + cp_n + wp_n + kn + pn; /* (the fixed parts and headers: 132 at most) */
        PyObject *blob = PyBytes_FromStringAndSize(NULL, cap);
        if (blob == NULL) {
            return fail(pre, hashes, keys, blobs);
        }
        unsigned char *b0 = (unsigned char *)PyBytes_AS_STRING(blob), *b = b0;
        b = put_raw(b, "\x89\xa7" "context", 9);
        b = put_raw(b, cp, (size_t)cp_n);
        b = put_raw(b, "\xa3" "seq", 4);
        b = put_uint(b, seq);
        b = put_raw(b, "\xa3" "key", 4);
        b = put_str(b, kb, kn);
        b = put_raw(b, "\xa7" "payload", 8);
        b = put_bin(b, pb, pn);
        b = put_raw(b, "\xa8" "metadata" "\x80", 10);
        b = put_raw(b, "\xa7" "lamport", 8);
        b = put_uint(b, lamport);
        b = put_raw(b, "\xa5" "ts_ns", 6);
        b = put_uint(b, ts_v);
        b = put_raw(b, "\xa6" "writer", 7);
        b = put_raw(b, wp, (size_t)wp_n);
        b = put_raw(b, "\xa4" "hash" "\xc4\x20", 7);
        b = put_raw(b, PyBytes_AS_STRING(h), 32);
        if (_PyBytes_Resize(&blob, (Py_ssize_t)(b - b0)) < 0) {
            return fail(pre, hashes, keys, blobs);
        }
        PyList_SET_ITEM(blobs, i, blob);
        Py_INCREF(h);
        PyList_SET_ITEM(hashes, i, h);
        Py_INCREF(k);
        PyList_SET_ITEM(keys, i, k);
        if (lamport > max_lamport) {
            max_lamport = lamport;
        }
    }
    return Py_BuildValue("(NNNNKK)", pre, hashes, keys, blobs, max_lamport, lamport);
}

/* reading the canonical map back: a cursor over `b` .. `end`; every step fails (returns 0) on
   anything but the exact form encode_entry_parts writes */
typedef struct {
    const unsigned char *p, *end;
} cursor;

static inline int take(cursor *c, const char *lit, size_t n) {
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0) {
        return 0;
    }
    c->p += n;
    return 1;
}

static inline int take_be(cursor *c, int n, unsigned long long *v) {
    if (c->end - c->p < n) {
        return 0;
    }
    unsigned long long x = 0;
    for (int i = 0; i < n; i++) {
        x = (x << 8) | c->p[i];
    }
    c->p += n;
    *v = x;
    return 1;
}

static inline int take_uint(cursor *c, unsigned long long *v) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p++;
    if (t < 0x80) {
        *v = t;
        return 1;
    }
    switch (t) {
    case 0xcc: return take_be(c, 1, v);
    case 0xcd: return take_be(c, 2, v);
    case 0xce: return take_be(c, 4, v);
    case 0xcf: return take_be(c, 8, v);
    default: return 0;
    }
}

/* a str or bin: its bytes (`str` chooses which family of headers) */
static inline int take_raw(cursor *c, int str, const unsigned char **s, unsigned long long *n) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p++;
    int ok;
    if (str && (t & 0xe0) == 0xa0) {
        *n = t & 0x1f;
        ok = 1;
    } else if (t == (str ? 0xd9 : 0xc4)) {
        ok = take_be(c, 1, n);
    } else if (t == (str ? 0xda : 0xc5)) {
        ok = take_be(c, 2, n);
    } else if (t == (str ? 0xdb : 0xc6)) {
        ok = take_be(c, 4, n);
    } else {
        return 0;
    }
    if (!ok || (unsigned long long)(c->end - c->p) < *n) {
        return 0;
    }
    *s = c->p;
    c->p += *n;
    return 1;
}

/* stored_preimage(blob, seq, names, context_packed, writer_packed) -> the pre-image of the leaf hash of entry `seq` as `blob`
   holds it (the hash is the blob's last 32 bytes), or None when the blob is not an entry laid out
   as encode_entry_parts writes it (its fields in that order, integers in any unsigned width, as
   msgpack reads them) with an ASCII key and no metadata, naming the context and writer exactly as
   packed by the caller (its names): the caller's Python path decides the rest */
static PyObject *stored_preimage(PyObject *self, PyObject *args) {
    const unsigned char *b, *names, *cp, *wp;
    Py_ssize_t bn, names_n, cp_n, wp_n;
    PyObject *seq_obj;
    if (!PyArg_ParseTuple(args, "y#Oy#y#y#", &b, &bn, &seq_obj, &names, &names_n, &cp, &cp_n, &wp, &wp_n)) {
        return NULL;
    }
    unsigned long long want, seq, lamport, ts;
    const unsigned char *key, *payload;
    unsigned long long key_n, payload_n;
    if (as_u64(seq_obj, &want) < 0) {
        Py_RETURN_NONE;
    }
    cursor c = {b, b + bn};
    if (!take(&c, "\x89\xa7" "context", 9) || !take(&c, (const char *)cp, (size_t)cp_n) || !take(&c, "\xa3" "seq", 4) ||
        !take_uint(&c, &seq) || seq != want || !take(&c, "\xa3" "key", 4) || !take_raw(&c, 1, &key, &key_n) ||
        !take(&c, "\xa7" "payload", 8) || !take_raw(&c, 0, &payload, &payload_n) ||
        !take(&c, "\xa8" "metadata" "\x80", 10) || !take(&c, "\xa7" "lamport", 8) || !take_uint(&c, &lamport) ||
        !take(&c, "\xa5" "ts_ns", 6) || !take_uint(&c, &ts) || !take(&c, "\xa6" "writer", 7) ||
        !take(&c, (const char *)wp, (size_t)wp_n) || !take(&c, "\xa4" "hash" "\xc4\x20", 7) || c.end - c.p != 32) {
        Py_RETURN_NONE;
    }
    for (unsigned long long i = 0; i < key_n; i++) {
        if (key[i] & 0x80) {
            Py_RETURN_NONE; /* (a non-ASCII key: Python checks its UTF-8) */
        }
    }
    return preimage(seq, lamport, ts, (const char *)names, names_n, (const char *)key, key_n,
                    (const char *)payload, payload_n);
}

/* the same, insisting on the shortest forms msgpack-python writes (what encode_entry_parts gives):
   an integer in the fewest bytes, a str or bin under the smallest header that holds it */
static inline int take_uint_strict(cursor *c, unsigned long long *v) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p;
    if (!take_uint(c, v)) {
        return 0;
    }
    switch (t) {
    case 0xcc: return *v >= 0x80;
    case 0xcd: return *v > 0xff;
    case 0xce: return *v > 0xffff;
    case 0xcf: return *v > 0xffffffffULL;
    default: return 1;
    }
}

static inline int take_raw_strict(cursor *c, int str, const unsigned char **s, unsigned long long *n) {
    if (c->p >= c->end) {
        return 0;
    }
    unsigned char t = *c->p;
    if (!take_raw(c, str, s, n)) {
        return 0;
    }
    if (str && (t & 0xe0) == 0xa0) {
        return 1;
    }
    if (t == (str ? 0xd9 : 0xc4)) {
        return !str || *n >= 32;
    }
    if (t == (str ? 0xda : 0xc5)) {
        return *n > 0xff;
    }
    return *n > 0xffff;
}

static int ascii(const unsigned char *s, unsigned long long n) {
    for (unsigned long long i = 0; i < n; i++) {
        if (s[i] & 0x80) {
            return 0;
        }
    }
    return 1;
}

/* packed_parts(blobs, first_seq, context) -> (preimages, hashes, keys, max_lamport, last_lamport, writer)
   or None: a pull reply's entries sent packed (each a bin holding the entry's stored bytes, SPEC
   17.2), of ASCII context `context`, seqs first_seq on. Each blob must be exactly what
   encode_entry_parts writes for it (the shortest forms, the fields in order, no metadata, an ASCII
   key of at most MAX_KEY_BYTES, lamport <= MAX_LAMPORT), naming `context` and the first blob's writer
   (ASCII, 1..MAX_WRITER_BYTES): then the caller stores the blobs as they came once their hashes
   hold. Anything else: None, and the caller decodes the blobs and takes the Python path. */
static PyObject *packed_parts(PyObject *self, PyObject *args) {
    PyObject *blobs, *first_obj, *context;
    if (!PyArg_ParseTuple(args, "O!OU", &PyList_Type, &blobs, &first_obj, &context)) {
        return NULL;
    }
    unsigned long long seq;
    Py_ssize_t n = PyList_GET_SIZE(blobs);
    if (as_u64(first_obj, &seq) < 0 || seq == 0 || n == 0 || !PyUnicode_IS_READY(context) ||
        !PyUnicode_IS_ASCII(context) || PyUnicode_GET_LENGTH(context) == 0 ||
        PyUnicode_GET_LENGTH(context) > MAX_CONTEXT_BYTES) {
        Py_RETURN_NONE;
    }
    const char *cs = (const char *)PyUnicode_DATA(context);
    Py_ssize_t cn = PyUnicode_GET_LENGTH(context);
    /* the context as packed (cp) and the leaf's names (lp(context) || lp(writer)), once the
       first blob gave the writer */
    unsigned char cp[8 + MAX_CONTEXT_BYTES], wp[8 + MAX_WRITER_BYTES], names[8 + MAX_CONTEXT_BYTES + MAX_WRITER_BYTES];
    Py_ssize_t cp_n = put_str(cp, cs, cn) - cp, wp_n = 0, names_n = 0;
    PyObject *writer = NULL;
    PyObject *pre = PyList_New(n), *hashes = PyList_New(n), *keys = PyList_New(n);
    if (pre == NULL || hashes == NULL || keys == NULL) {
        return fail(pre, hashes, keys, NULL);
    }
    unsigned long long max_lamport = 0, lamport = 0;
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        PyObject *blob = PyList_GET_ITEM(blobs, i);
        if (!PyBytes_CheckExact(blob) || seq == 0) {
            return fail(pre, hashes, keys, writer);
        }
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(blob);
        cursor c = {b, b + PyBytes_GET_SIZE(blob)};
        const unsigned char *key, *payload;
        unsigned long long s, key_n, payload_n, ts;
        if (!take(&c, "\x89\xa7" "context", 9) || !take(&c, (const char *)cp, (size_t)cp_n) ||
            !take(&c, "\xa3" "seq", 4) || !take_uint_strict(&c, &s) || s != seq || !take(&c, "\xa3" "key", 4) ||
            !take_raw_strict(&c, 1, &key, &key_n) || key_n > MAX_KEY_BYTES || !ascii(key, key_n) ||
            !take(&c, "\xa7" "payload", 8) || !take_raw_strict(&c, 0, &payload, &payload_n) ||
            !take(&c, "\xa8" "metadata" "\x80", 10) || !take(&c, "\xa7" "lamport", 8) ||
            !take_uint_strict(&c, &lamport) || lamport > MAX_LAMPORT || !take(&c, "\xa5" "ts_ns", 6) ||
            !take_uint_strict(&c, &ts) || !take(&c, "\xa6" "writer", 7)) {
            return fail(pre, hashes, keys, writer);
        }
        if (writer == NULL) {
            const unsigned char *w;
            unsigned long long w_n;
            const unsigned char *at = c.p;
            if (!take_raw_strict(&c, 1, &w, &w_n) || w_n == 0 || w_n > MAX_WRITER_BYTES || !ascii(w, w_n)) {
                return fail(pre, hashes, keys, writer);
            }
            wp_n = c.p - at;
            memcpy(wp, at, (size_t)wp_n);
            unsigned char *q = put_be(names, (unsigned long long)cn, 4);
            q = put_raw(q, cs, (size_t)cn);
            q = put_be(q, w_n, 4);
            q = put_raw(q, (const char *)w, (size_t)w_n);
            names_n = q - names;
            writer = PyUnicode_DecodeASCII((const char *)w, (Py_ssize_t)w_n, NULL);
            if (writer == NULL) {
                return fail(pre, hashes, keys, NULL);
            }
        } else if (!take(&c, (const char *)wp, (size_t)wp_n)) {
            return fail(pre, hashes, keys, writer);
        }
        if (!take(&c, "\xa4" "hash" "\xc4\x20", 7) || c.end - c.p != 32) {
            return fail(pre, hashes, keys, writer);
        }
        PyObject *pi = preimage(seq, lamport, ts, (const char *)names, names_n, (const char *)key, key_n,
                                (const char *)payload, payload_n);
        if (pi == NULL) {
            return fail(pre, hashes, keys, writer);
        }
        PyList_SET_ITEM(pre, i, pi);
        PyObject *h = PyBytes_FromStringAndSize((const char *)c.p, 32);
        if (h == NULL) {
            return fail(pre, hashes, keys, writer);
        }
        PyList_SET_ITEM(hashes, i, h);
        PyObject *k = PyUnicode_DecodeASCII((const char *)key, (Py_ssize_t)key_n, NULL);
        if (k == NULL) {
            return fail(pre, hashes, keys, writer);
        }
        PyList_SET_ITEM(keys, i, k);
        if (lamport > max_lamport) {
            max_lamport = lamport;
        }
    }
    return Py_BuildValue("(NNNKKN)", pre, hashes, keys, max_lamport, lamport, writer);
}

static PyMethodDef methods[] = {
    {"stored_preimage", stored_preimage, METH_VARARGS,
     "stored_preimage(blob, seq, names, context_packed, writer_packed) -> the leaf hash's pre-image of a "
     "stored entry, or None"},
    {"packed_parts", packed_parts, METH_VARARGS,
     "packed_parts(blobs, first_seq, context) -> (preimages, hashes, keys, max_lamport, last_lamport, writer) "
     "or None"},
    {"replica_parts", replica_parts, METH_VARARGS,
     "replica_parts(maps, first_seq, context, writer, names, context_packed, writer_packed) -> "
     "(preimages, hashes, keys, blobs, max_lamport, last_lamport) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_accel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__accel(void) {
    const char *names[] = {"context", "seq", "key", "payload", "metadata", "lamport", "ts_ns", "writer", "hash"};
    PyObject **slots[] = {&k_context, &k_seq, &k_key, &k_payload, &k_metadata, &k_lamport, &k_ts_ns, &k_writer, &k_hash};
    for (int i = 0; i < 9; i++) {
        *slots[i] = PyUnicode_InternFromString(names[i]);
        if (*slots[i] == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module);
}

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
#include <dlfcn.h>
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
static Py_ssize_t preimage_size(Py_ssize_t names_n, unsigned long long key_n, unsigned long long payload_n) {
    return (Py_ssize_t)(1 + 24 + names_n + 4 + key_n + 4 + 4 + payload_n);
}

static void put_preimage(unsigned char *p, unsigned long long seq, unsigned long long lamport, unsigned long long ts,
                         const char *names, Py_ssize_t names_n, const char *key, unsigned long long key_n,
                         const char *payload, unsigned long long payload_n) {
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
}

static PyObject *preimage(unsigned long long seq, unsigned long long lamport, unsigned long long ts,
                          const char *names, Py_ssize_t names_n, const char *key, unsigned long long key_n,
                          const char *payload, unsigned long long payload_n) {
    PyObject *pi = PyBytes_FromStringAndSize(NULL, preimage_size(names_n, key_n, payload_n));
    if (pi == NULL) {
        return NULL;
    }
    put_preimage((unsigned char *)PyBytes_AS_STRING(pi), seq, lamport, ts, names, names_n, key, key_n, payload,
                 payload_n);
    return pi;
}

/* SHA-256, where this process has OpenSSL's libcrypto (Python's hashlib loads it): its low-level
   SHA256_Init/Update/Final, found at import by dlopen (no OpenSSL headers needed to build; the
   one-shot SHA256() of OpenSSL 3 looks the algorithm up at every call, several times slower for
   the short inputs here). Without them (or with `set_hashing(False)`) the functions below leave
   the hashing to the caller, as before. */
typedef int (*sha_init_fn)(void *);
typedef int (*sha_update_fn)(void *, const void *, size_t);
typedef int (*sha_final_fn)(unsigned char *, void *);
static sha_init_fn sha_init;
static sha_update_fn sha_update;
static sha_final_fn sha_final;
static int sha_found = 0, sha_on = 0;

/* (SHA256_CTX is 112 bytes in every OpenSSL since 0.9.8; room to spare) */
static void sha256_of(const unsigned char *d, size_t n, unsigned char *md) {
    _Alignas(16) unsigned char ctx[256];
    sha_init(ctx);
    sha_update(ctx, d, n);
    sha_final(md, ctx);
}

static void find_sha256(void) {
    /* only a libcrypto this process has loaded already (RTLD_NOLOAD): never a second OpenSSL */
    const char *libs[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
    for (int i = 0; i < 3 && !sha_found; i++) {
        void *h = dlopen(libs[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (h == NULL) {
            continue;
        }
        sha_init = (sha_init_fn)dlsym(h, "SHA256_Init");
        sha_update = (sha_update_fn)dlsym(h, "SHA256_Update");
        sha_final = (sha_final_fn)dlsym(h, "SHA256_Final");
        sha_found = sha_init != NULL && sha_update != NULL && sha_final != NULL;
    }
    if (sha_found) {
        /* FIPS 180-2's examples: "abc", and 56 bytes (two blocks) */
        static const unsigned char abc[32] = {
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
            0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};
        static const unsigned char two[32] = {
            0x24, 0x8d, 0x6a, 0x61, 0xd2, 0x06, 0x38, 0xb8, 0xe5, 0xc0, 0x26, 0x93, 0x0c, 0x3e, 0x60, 0x39,
            0xa3, 0x3c, 0xe4, 0x59, 0x64, 0xff, 0x21, 0x67, 0xf6, 0xec, 0xed, 0xd4, 0x19, 0xdb, 0x06, 0xc1};
        unsigned char got[32];
        sha256_of((const unsigned char *)"abc", 3, got);
        int ok = memcmp(got, abc, 32) == 0;
        sha256_of((const unsigned char *)"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56, got);
        sha_found = ok && memcmp(got, two, 32) == 0;
    }
    sha_on = sha_found;
}

/* a reusable buffer for pre-images (grown as needed; the GIL is held) */
static unsigned char *scratch = NULL;
static Py_ssize_t scratch_n = 0;

#define SCRATCH_KEEP (1 << 20)

/* let go of a buffer grown past SCRATCH_KEEP (a peer's large entry) */
static void scratch_trim(void) {
    if (scratch_n > SCRATCH_KEEP) {
        PyMem_Free(scratch);
        scratch = NULL;
        scratch_n = 0;
    }
}

static unsigned char *scratch_of(Py_ssize_t n) {
    if (n > scratch_n) {
        unsigned char *p = PyMem_Realloc(scratch, (size_t)n);
        if (p == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        scratch = p;
        scratch_n = n;
    }
    return scratch;
}

/* whether the leaf hash of these fields is `h` (32 bytes); -1 on an error (raised) */
static int leaf_holds(const unsigned char *h, unsigned long long seq, unsigned long long lamport, unsigned long long ts,
                      const char *names, Py_ssize_t names_n, const char *key, unsigned long long key_n,
                      const char *payload, unsigned long long payload_n) {
    Py_ssize_t n = preimage_size(names_n, key_n, payload_n);
    unsigned char *buf = scratch_of(n), out[32];
    if (buf == NULL) {
        return -1;
    }
    put_preimage(buf, seq, lamport, ts, names, names_n, key, key_n, payload, payload_n);
    sha256_of(buf, (size_t)n, out);
    return memcmp(out, h, 32) == 0;
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

/* the first fields of an entry in encode_entry_parts' layout, from its start through the key
   "writer": the context as `cp` packs it, an ASCII key, no metadata; every integer, str and bin
   header in its shortest form when `strict` (the bytes this node stores), in any width msgpack
   reads otherwise. 0 on anything else. */
typedef struct {
    unsigned long long seq, lamport, ts, key_n, payload_n;
    const unsigned char *key, *payload;
} entry_head;

static inline int take_u(cursor *c, int strict, unsigned long long *v) {
    return strict ? take_uint_strict(c, v) : take_uint(c, v);
}

static inline int take_r(cursor *c, int strict, int str, const unsigned char **s, unsigned long long *n) {
    return strict ? take_raw_strict(c, str, s, n) : take_raw(c, str, s, n);
}

static int take_head(cursor *c, const unsigned char *cp, Py_ssize_t cp_n, int strict, entry_head *e) {
    return take(c, "\x89\xa7" "context", 9) && take(c, (const char *)cp, (size_t)cp_n) && take(c, "\xa3" "seq", 4) &&
           take_u(c, strict, &e->seq) && take(c, "\xa3" "key", 4) && take_r(c, strict, 1, &e->key, &e->key_n) &&
           ascii(e->key, e->key_n) && take(c, "\xa7" "payload", 8) &&
           take_r(c, strict, 0, &e->payload, &e->payload_n) && take(c, "\xa8" "metadata" "\x80", 10) &&
           take(c, "\xa7" "lamport", 8) && take_u(c, strict, &e->lamport) && take(c, "\xa5" "ts_ns", 6) &&
           take_u(c, strict, &e->ts) && take(c, "\xa6" "writer", 7);
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
    unsigned long long want;
    entry_head e;
    if (as_u64(seq_obj, &want) < 0) {
        Py_RETURN_NONE;
    }
    cursor c = {b, b + bn};
    if (!take_head(&c, cp, cp_n, 0, &e) || e.seq != want || !take(&c, (const char *)wp, (size_t)wp_n) ||
        !take(&c, "\xa4" "hash" "\xc4\x20", 7) || c.end - c.p != 32) {
        Py_RETURN_NONE; /* (a non-ASCII key among them: Python checks its UTF-8) */
    }
    return preimage(e.seq, e.lamport, e.ts, (const char *)names, names_n, (const char *)e.key, e.key_n,
                    (const char *)e.payload, e.payload_n);
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
    scratch_trim();
    const char *cs = (const char *)PyUnicode_DATA(context);
    Py_ssize_t cn = PyUnicode_GET_LENGTH(context);
    /* the context as packed (cp) and the leaf's names (lp(context) || lp(writer)), once the
       first blob gave the writer */
    unsigned char cp[8 + MAX_CONTEXT_BYTES], wp[8 + MAX_WRITER_BYTES], names[8 + MAX_CONTEXT_BYTES + MAX_WRITER_BYTES];
    Py_ssize_t cp_n = put_str(cp, cs, cn) - cp, wp_n = 0, names_n = 0;
    PyObject *writer = NULL;
    /* with SHA-256 here, each leaf hash is checked now and no pre-images are returned */
    PyObject *pre = sha_on ? Py_NewRef(Py_None) : PyList_New(n), *hashes = PyList_New(n),
             *keys = PyList_New(n);
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
        entry_head e;
        if (!take_head(&c, cp, cp_n, 1, &e) || e.seq != seq || e.key_n > MAX_KEY_BYTES || e.lamport > MAX_LAMPORT) {
            return fail(pre, hashes, keys, writer);
        }
        const unsigned char *key = e.key, *payload = e.payload;
        unsigned long long key_n = e.key_n, payload_n = e.payload_n, ts = e.ts;
        lamport = e.lamport;
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
        if (sha_on) {
            int ok = leaf_holds(c.p, seq, lamport, ts, (const char *)names, names_n, (const char *)key, key_n,
                                (const char *)payload, payload_n);
            if (ok <= 0) {
                return fail(pre, hashes, keys, writer); /* (a hash that does not hold: Python words it) */
            }
        } else {
            PyObject *pi = preimage(seq, lamport, ts, (const char *)names, names_n, (const char *)key, key_n,
                                    (const char *)payload, payload_n);
            if (pi == NULL) {
                return fail(pre, hashes, keys, writer);
            }
            PyList_SET_ITEM(pre, i, pi);
        }
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

/* frontier_extend(nodes, size, leaves, keep_from) -> [(level, index, hash)] of the nodes of level >=
   keep_from (>= 1) completed, as protocol.merkle.Frontier.extend, whose `nodes` list it updates in
   place (the caller moves its size on); None without SHA-256 here (nothing changed) */
static PyObject *frontier_extend(PyObject *self, PyObject *args) {
    PyObject *nodes, *size_obj, *leaves, *keep_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &nodes, &size_obj, &leaves, &keep_obj)) {
        return NULL;
    }
    unsigned long long size, keep;
    if (!sha_on || !PyList_CheckExact(nodes) || !PyList_CheckExact(leaves) || as_u64(size_obj, &size) < 0 ||
        as_u64(keep_obj, &keep) < 0 || keep < 1 || keep > 64) {
        Py_RETURN_NONE; /* (not the plain case: Frontier.extend does it in Python) */
    }
    int keep_from = (int)keep;
    Py_ssize_t n = PyList_GET_SIZE(leaves), depth = PyList_GET_SIZE(nodes);
    if ((unsigned long long)n > 0xffffffffffffffffULL - size) {
        Py_RETURN_NONE; /* (a size past 2^64 - 1: Python's, which words it) */
    }
    /* the frontier as it must be: one 32-byte node per level where `size` has a 1 bit, and
       checked before anything changes */
    if (depth > 64) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t l = 0; l < depth; l++) {
        PyObject *x = PyList_GET_ITEM(nodes, l);
        if (!PyBytes_CheckExact(x) || PyBytes_GET_SIZE(x) != 32) {
            Py_RETURN_NONE;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyList_GET_ITEM(leaves, i);
        if (!PyBytes_CheckExact(x) || PyBytes_GET_SIZE(x) != 32) {
            Py_RETURN_NONE;
        }
    }
    unsigned char cur[65][32];  /* the frontier's nodes, by level, while extending */
    int have = (int)depth;
    for (int l = 0; l < have; l++) {
        memcpy(cur[l], PyBytes_AS_STRING(PyList_GET_ITEM(nodes, l)), 32);
    }
    PyObject *done = PyList_New(0);
    if (done == NULL) {
        return NULL;
    }
    unsigned char buf[65];
    buf[0] = 0x01; /* INNER_PREFIX */
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long index = size;
        unsigned char node[32];
        memcpy(node, PyBytes_AS_STRING(PyList_GET_ITEM(leaves, i)), 32);
        int level = 0;
        while (index & 1) {
            if (level >= have) {  /* (a frontier that does not match its size) */
                Py_DECREF(done);
                Py_RETURN_NONE;
            }
            memcpy(buf + 1, cur[level], 32);
            memcpy(buf + 33, node, 32);
            memcpy(cur[level], node, 32);
            sha256_of(buf, 65, node);
            level++;
            index >>= 1;
            if (level >= keep_from) {
                PyObject *t = Py_BuildValue("(iKy#)", level, index, (const char *)node, (Py_ssize_t)32);
                if (t == NULL || PyList_Append(done, t) < 0) {
                    Py_XDECREF(t);
                    Py_DECREF(done);
                    return NULL;
                }
                Py_DECREF(t);
            }
        }
        memcpy(cur[level], node, 32);
        if (level >= have) {
            have = level + 1;
        }
        size++;
    }
    /* every new node made before `nodes` changes, so that a failure leaves it as it was */
    PyObject *fresh[65];
    for (int l = 0; l < have; l++) {
        fresh[l] = PyBytes_FromStringAndSize((const char *)cur[l], 32);
        if (fresh[l] == NULL) {
            for (int k = 0; k < l; k++) {
                Py_DECREF(fresh[k]);
            }
            Py_DECREF(done);
            return NULL;
        }
    }
    Py_ssize_t old_n = depth;
    for (int l = (int)depth; l < have; l++) { /* (levels the tree grew by) */
        if (PyList_Append(nodes, fresh[l]) < 0) {
            if (PyList_SetSlice(nodes, old_n, PyList_GET_SIZE(nodes), NULL) < 0) {
                PyErr_Clear(); /* (shrinking a list does not fail) */
            }
            for (int k = 0; k < have; k++) {
                Py_DECREF(fresh[k]);
            }
            Py_DECREF(done);
            return NULL;
        }
    }
    for (int l = 0; l < have; l++) {
        if (l < depth) {
            PyObject *old = PyList_GET_ITEM(nodes, l);
            PyList_SET_ITEM(nodes, l, fresh[l]); /* (steals it) */
            Py_DECREF(old);
        } else {
            Py_DECREF(fresh[l]); /* (the list holds its own reference) */
        }
    }
    return done;
}

/* frontier_root(nodes, size) -> the root of a tree of `size` leaves from its frontier's nodes, as
   protocol.merkle.root_at (the right edge climbed from the smallest peak, an odd last node paired
   with itself, the size bound in); None for size 0, a frontier that does not hold the nodes the
   size needs, or without SHA-256 here */
static PyObject *frontier_root(PyObject *self, PyObject *args) {
    PyObject *nodes, *size_obj;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &nodes, &size_obj)) {
        return NULL;
    }
    unsigned long long size;
    if (!sha_on || as_u64(size_obj, &size) < 0 || size == 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t depth = PyList_GET_SIZE(nodes);
    int level = 0;
    while (!((size >> level) & 1)) {
        level++;
    }
    unsigned long long count = size >> level;
    unsigned char edge[32], buf[65];
    if (level >= depth) {
        Py_RETURN_NONE;
    }
    PyObject *x = PyList_GET_ITEM(nodes, level);
    if (!PyBytes_CheckExact(x) || PyBytes_GET_SIZE(x) != 32) {
        Py_RETURN_NONE;
    }
    memcpy(edge, PyBytes_AS_STRING(x), 32);
    buf[0] = 0x01;
    while (count > 1) {
        if (count % 2 == 0) {
            if (level >= depth) {
                Py_RETURN_NONE;
            }
            x = PyList_GET_ITEM(nodes, level);
            if (!PyBytes_CheckExact(x) || PyBytes_GET_SIZE(x) != 32) {
                Py_RETURN_NONE;
            }
            memcpy(buf + 1, PyBytes_AS_STRING(x), 32);
        } else {
            memcpy(buf + 1, edge, 32);
        }
        memcpy(buf + 33, edge, 32);
        sha256_of(buf, 65, edge);
        count = (count >> 1) + (count & 1); /* (count + 1) / 2, without wrapping at 2^64 - 1 */
        level++;
    }
    unsigned char root[41];
    root[0] = 0x02; /* ROOT_PREFIX */
    put_be(root + 1, size, 8);
    memcpy(root + 9, edge, 32);
    unsigned char out[32];
    sha256_of(root, 41, out);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

/* stored_holds(blob, seq, names, context_packed, writer_packed) -> True when `blob` is entry `seq` in
   the form stored_preimage reads and its hash holds; None when that is not decided here (another
   form, a hash that does not hold, no SHA-256 here): the caller's Python path decides */
static PyObject *stored_holds(PyObject *self, PyObject *args) {
    if (!sha_on || PyTuple_GET_SIZE(args) < 1 || !PyBytes_CheckExact(PyTuple_GET_ITEM(args, 0))) {
        Py_RETURN_NONE;
    }
    PyObject *pre = stored_preimage(self, args);
    if (pre == NULL || pre == Py_None) {
        return pre;
    }
    unsigned char out[32];
    PyObject *blob = PyTuple_GET_ITEM(args, 0);
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(blob);
    Py_ssize_t bn = PyBytes_GET_SIZE(blob); /* (>= 32: stored_preimage read a hash at its end) */
    sha256_of((const unsigned char *)PyBytes_AS_STRING(pre), (size_t)PyBytes_GET_SIZE(pre), out);
    Py_DECREF(pre);
    if (memcmp(out, b + bn - 32, 32) == 0) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_NONE;
}

/* stage(pending, tail, hot_append, cid, first_seq, keys, blobs, overhead) -> the bytes held, or None:
   node.ledger._stage_py's loop (each entry's blob under its storage key in `pending`, (key, blob)
   under its seq in `tail`, (cid, seq, len(blob) + overhead) given to `hot_append`), for the
   plain case: dicts, lists of equal length, bytes blobs, cid below 2^32, no seq past 2^64 - 1.
   None before anything changed: the caller runs the Python loop. */
static PyObject *stage(PyObject *self, PyObject *args) {
    PyObject *pending, *tail, *hot_append, *cid_obj, *first_obj, *keys, *blobs, *over_obj;
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &pending, &tail, &hot_append, &cid_obj, &first_obj, &keys, &blobs,
                          &over_obj)) {
        return NULL;
    }
    unsigned long long cid, first, over;
    if (!PyDict_CheckExact(pending) || !PyDict_CheckExact(tail) || !PyList_CheckExact(keys) ||
        !PyList_CheckExact(blobs) || PyList_GET_SIZE(keys) != PyList_GET_SIZE(blobs) || as_u64(cid_obj, &cid) < 0 ||
        cid > 0xffffffffULL || as_u64(first_obj, &first) < 0 || as_u64(over_obj, &over) < 0 ||
        over > 0xffffffffULL) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(blobs);
    if (n > 0 && (first == 0 || (unsigned long long)(n - 1) > 0xffffffffffffffffULL - first)) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(blobs, i))) {
            Py_RETURN_NONE;
        }
    }
    unsigned long long nbytes = 0;
    unsigned char kb[13];
    kb[0] = 'E'; /* node.storage.ENTRY */
    put_be(kb + 1, cid, 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long seq = first + (unsigned long long)i;
        PyObject *blob = PyList_GET_ITEM(blobs, i), *key = PyList_GET_ITEM(keys, i);
        put_be(kb + 5, seq, 8);
        PyObject *k = PyBytes_FromStringAndSize((const char *)kb, 13);
        PyObject *s = PyLong_FromUnsignedLongLong(seq);
        PyObject *kv = PyTuple_Pack(2, key, blob);
        unsigned long long size = (unsigned long long)PyBytes_GET_SIZE(blob) + over;
        PyObject *hot = Py_BuildValue("(KKK)", cid, seq, size);
        int bad = k == NULL || s == NULL || kv == NULL || hot == NULL || PyDict_SetItem(pending, k, blob) < 0 ||
                  PyDict_SetItem(tail, s, kv) < 0;
        PyObject *r = bad ? NULL : PyObject_CallOneArg(hot_append, hot);
        Py_XDECREF(k);
        Py_XDECREF(s);
        Py_XDECREF(kv);
        Py_XDECREF(hot);
        if (r == NULL) {
            return NULL; /* (out of memory: raised) */
        }
        Py_DECREF(r);
        nbytes += size;
    }
    return PyLong_FromUnsignedLongLong(nbytes);
}

/* set_hashing(on) -> whether SHA-256 is now done here (False when it was not found): for tests */
static PyObject *set_hashing(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) {
        return NULL;
    }
    sha_on = on && sha_found;
    return PyBool_FromLong(sha_on);
}

static PyMethodDef methods[] = {
    {"frontier_extend", frontier_extend, METH_VARARGS,
     "frontier_extend(nodes, size, leaves, keep_from) -> [(level, index, hash)] or None"},
    {"stage", stage, METH_VARARGS,
     "stage(pending, tail, hot_append, cid, first_seq, keys, blobs, overhead) -> bytes held, or None"},
    {"frontier_root", frontier_root, METH_VARARGS, "frontier_root(nodes, size) -> the root, or None"},
    {"stored_holds", stored_holds, METH_VARARGS,
     "stored_holds(blob, seq, names, context_packed, writer_packed) -> True or None"},
    {"set_hashing", set_hashing, METH_O, "set_hashing(on) -> whether SHA-256 is done in C now"},
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
    PyObject *hl = PyImport_ImportModule("_hashlib"); /* (loads libcrypto, where Python has it) */
    if (hl == NULL) {
        PyErr_Clear();
    }
    Py_XDECREF(hl);
    find_sha256();
    return PyModule_Create(&module);
}

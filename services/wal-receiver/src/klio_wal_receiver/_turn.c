/* A synchronous standby's turn in native code: receive, seal, write durably, report.
 *
 * `pump.SyncPump` runs its loop through `Turn.run` where the compiled module is available (built
 * with the package; optional). `run` makes the same turns as the Python loop, with the same
 * libpq calls, frame format and system calls, and without the GIL: it returns to Python for
 * everything uncommon (a message that starts a new segment or repeats archived bytes, an append
 * that `PartialWriter.append_sync` would not take its short path for, a stop, an error) and
 * every `state_every` seconds, so that Python brings the metrics up to date and reaps the
 * segment worker. Python keeps the state in between: it loads it into the object's members
 * before a call and reads it back after.
 *
 * libpq is called through the addresses of the functions psycopg's own libpq exports (passed
 * by `native.py`), never a second copy of the library: a PGconn is only valid with its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define BLOCK 4096
#define FRAME_HEAD 21  /* >IBQI fields (17 bytes), then the CRC-32 of the fields */
#define TAG_SIZE 16
#define PG_EPOCH_US 946684800000000LL

enum { R_STATE, R_STOP, R_END, R_BROKEN, R_SLOW, R_NOFAST, R_IOERR, R_PENDING };

typedef int (*get_copy_data_fn)(void *, char **, int);
typedef void (*freemem_fn)(void *);
typedef int (*consume_fn)(void *);
typedef int (*put_copy_data_fn)(void *, const char *, int);
typedef int (*flush_fn)(void *);

typedef struct {
    PyObject_HEAD
    void *conn;
    get_copy_data_fn get_copy_data;
    freemem_fn freemem;
    consume_fn consume;
    put_copy_data_fn put_copy_data;
    flush_fn flush;
    EVP_CIPHER_CTX *ctx;
    unsigned char prefix[4];
    unsigned char digest[16];
    int keyed;  /* key() was called: frames are sealed (tag > 0) or plain (tag == 0) */
    int tag;    /* bytes of AES-GCM tag after each payload */
    /* the state Python loads before `run` and reads back after it (members) */
    int sock, wake, dfd;
    long long base, seg_size, received, submitted, verify_until;
    long long file_size, allocated, index, frame_size, capacity, tail_start, tail_fill;
    long long durable, reported, wal_end, nbytes;
    double interval, last_status, last_state, state_every;
    int err;  /* errno of the failed write (R_IOERR) */
} Turn;

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

static uint64_t get64(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Frame `index` of `size` plaintext bytes at segment offset `offset`, sealed into `out`
 * (FRAME_HEAD + size + tag bytes): the layout of `frames.Sealer.seal_into`. Without a key the
 * payload is the plaintext and the CRC-32 covers it too. */
static int seal(Turn *t, unsigned char *out, const unsigned char *data, int size, long long offset) {
    unsigned char nonce[12], aad[37];
    int len = 0;
    put32(out, (uint32_t)(size + t->tag));
    out[4] = 0;
    put64(out + 5, (uint64_t)offset);
    put32(out + 13, (uint32_t)size);
    if (t->tag == 0) {
        memcpy(out + FRAME_HEAD, data, (size_t)size);
        put32(out + 17, (uint32_t)crc32(crc32(0, out, 17), data, (uInt)size));
        return 0;
    }
    put32(out + 17, (uint32_t)crc32(0, out, 17));
    memcpy(nonce, t->prefix, 4);
    put64(nonce + 4, (uint64_t)t->index);
    memcpy(aad, t->digest, 16);
    put64(aad + 16, (uint64_t)t->index);
    aad[24] = 0;
    put64(aad + 25, (uint64_t)offset);
    put32(aad + 33, (uint32_t)size);
    if (EVP_EncryptInit_ex(t->ctx, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_EncryptUpdate(t->ctx, NULL, &len, aad, (int)sizeof aad) != 1) return -1;
    if (EVP_EncryptUpdate(t->ctx, out + FRAME_HEAD, &len, data, size) != 1) return -1;
    if (EVP_EncryptFinal_ex(t->ctx, out + FRAME_HEAD + len, &len) != 1) return -1;
    return EVP_CIPHER_CTX_ctrl(t->ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, out + FRAME_HEAD + size) == 1
               ? 0
               : -1;
}

/* `DirectTail.space` + `append`: the frame goes after the file's last, partly filled block,
 * which is written again from its start, zero-padded to a block, with RWF_DSYNC. */
static int append(Turn *t, unsigned char *tail, const unsigned char *data, int size, long long offset) {
    long long length = FRAME_HEAD + size + t->tag;
    if (t->tail_start < 0 || t->tail_start + t->tail_fill != t->file_size) {
        long long start = t->file_size - t->file_size % BLOCK, keep = t->file_size - start;
        ssize_t got = pread(t->dfd, tail, BLOCK, start);
        if (got < keep) {
            t->err = got < 0 ? errno : EIO;
            return -1;
        }
        t->tail_start = start;
        t->tail_fill = keep;
    }
    if (seal(t, tail + t->tail_fill, data, size, offset) != 0) {
        t->err = EINVAL;
        return -2;
    }
    long long fill = t->tail_fill + length, padded = (fill + BLOCK - 1) / BLOCK * BLOCK;
    memset(tail + fill, 0, (size_t)(padded - fill));
    struct iovec iov = {tail, (size_t)padded};
    ssize_t written = pwritev2(t->dfd, &iov, 1, t->tail_start, RWF_DSYNC);
    if (written != padded) {
        t->err = written < 0 ? errno : EIO;
        t->tail_start = -1;
        return -1;
    }
    long long keep = fill % BLOCK, moved = fill - keep;
    if (moved) memmove(tail, tail + moved, (size_t)keep);
    t->tail_start += moved;
    t->tail_fill = keep;
    return 0;
}

/* Turns until one needs Python; the GIL is released throughout (buffers held by the caller). */
static int turns(Turn *t, unsigned char *buf, unsigned char *tail, char **slow, int *slow_len) {
    struct pollfd fds[2] = {{t->sock, POLLIN, 0}, {t->wake, POLLIN, 0}};
    int interval_ms = t->interval * 1000 < 1 ? 1 : (int)(t->interval * 1000);
    for (;;) {
        int reply = 0, n;
        char *msg = NULL;
        while ((n = t->get_copy_data(t->conn, &msg, 1)) > 0) {
            if (msg[0] == 'w' && n >= 25) {
                long long start = (long long)get64(msg + 1), end = (long long)get64(msg + 9);
                long long off = start - t->base, len = n - 25;
                if (off != t->received || t->verify_until > off || off + len >= t->seg_size) {
                    *slow = msg;  /* freed by the caller, after copying it */
                    *slow_len = n;
                    return R_SLOW;
                }
                memcpy(buf + off, msg + 25, (size_t)len);
                t->received = off + len;
                t->nbytes += len;
                if (end > t->wal_end) t->wal_end = end;
            } else if (msg[0] == 'k' && n >= 18) {
                long long end = (long long)get64(msg + 1);
                if (end > t->wal_end) t->wal_end = end;
                reply |= msg[17] != 0;
            } else if (msg[0] == 'w' || msg[0] == 'k') {
                *slow = msg;  /* too short: Python reports it as it always has */
                *slow_len = n;
                return R_SLOW;
            }
            t->freemem(msg);
        }
        if (n == -1) return R_END;
        if (n < 0) return R_BROKEN;
        if (t->received > t->submitted) {
            long long lo = t->submitted, size = t->received - lo;
            long long length = FRAME_HEAD + size + t->tag;
            if (size > t->frame_size || t->file_size + length > t->allocated || length > t->capacity)
                return R_NOFAST;
            int rc = append(t, tail, buf + lo, (int)size, lo);
            if (rc != 0) return R_IOERR;
            t->index += 1;
            t->file_size += length;
            t->submitted = t->received;
            t->durable = t->base + t->received;
        }
        double now = monotonic();
        if (reply || t->durable != t->reported || now - t->last_status >= t->interval) {
            struct timespec ts;
            unsigned char status[34];
            clock_gettime(CLOCK_REALTIME, &ts);
            long long us = (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 - PG_EPOCH_US;
            status[0] = 'r';
            put64(status + 1, (uint64_t)(t->base + t->received));
            put64(status + 9, (uint64_t)t->durable);
            put64(status + 17, 0);
            put64(status + 25, (uint64_t)us);
            status[33] = 0;
            if (t->put_copy_data(t->conn, (const char *)status, 34) != 1) return R_BROKEN;
            t->reported = t->durable;
            t->last_status = now;
            int pending = t->flush(t->conn);
            if (pending < 0) return R_BROKEN;
            if (pending > 0) return R_PENDING;
        } else {
            int wait = interval_ms - (int)((now - t->last_status) * 1000);
            int got = poll(fds, 2, wait < 1 ? 1 : wait);
            if (got < 0 && errno != EINTR) {
                t->err = errno;
                return R_BROKEN;
            }
            if (got <= 0) continue;
            if (fds[1].revents) return R_STOP;
        }
        if (t->consume(t->conn) != 1) return R_BROKEN;
        if (now - t->last_state >= t->state_every) {
            t->last_state = now;
            return R_STATE;
        }
    }
}

static PyObject *Turn_run(Turn *self, PyObject *args) {
    Py_buffer buf, tail;
    char *slow = NULL;
    int slow_len = 0, code;
    if (!PyArg_ParseTuple(args, "w*w*", &buf, &tail)) return NULL;
    if (!self->keyed || self->conn == NULL || buf.len < self->seg_size ||
        tail.len < self->capacity + 2 * BLOCK || ((uintptr_t)tail.buf % BLOCK) != 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&tail);
        PyErr_SetString(PyExc_ValueError, "turn: not set up for this segment");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    code = turns(self, buf.buf, tail.buf, &slow, &slow_len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyBuffer_Release(&tail);
    if (slow == NULL) return Py_BuildValue("(iO)", code, Py_None);
    PyObject *msg = PyBytes_FromStringAndSize(slow, slow_len);
    self->freemem(slow);
    if (msg == NULL) return NULL;
    return Py_BuildValue("(iN)", code, msg);
}

/* key(data_key, nonce_prefix, digest) for sealed frames; key(b"", ...) for plain frames (the
 * prefix and digest are not used then). */
static PyObject *Turn_key(Turn *self, PyObject *args) {
    Py_buffer key, prefix, digest;
    if (!PyArg_ParseTuple(args, "y*y*y*", &key, &prefix, &digest)) return NULL;
    int ok = key.len == 0 || (key.len == 32 && prefix.len == 4 && digest.len == 16);
    if (ok && key.len) {
        memcpy(self->prefix, prefix.buf, 4);
        memcpy(self->digest, digest.buf, 16);
        ok = EVP_EncryptInit_ex(self->ctx, EVP_aes_256_gcm(), NULL, key.buf, NULL) == 1;
    } else if (ok) {
        ok = EVP_CIPHER_CTX_reset(self->ctx) == 1;  /* no earlier key stays behind */
    }
    self->tag = key.len ? TAG_SIZE : 0;
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&digest);
    self->keyed = ok;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        "turn: a 32-byte key, 4-byte prefix, 16-byte digest (or no key)");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Turn_connect(Turn *self, PyObject *args) {
    unsigned long long conn, get, fre, consume, put, flush;
    if (!PyArg_ParseTuple(args, "KKKKKK", &conn, &get, &fre, &consume, &put, &flush)) return NULL;
    if (!conn || !get || !fre || !consume || !put || !flush) {
        PyErr_SetString(PyExc_ValueError, "turn: a null connection or libpq function");
        return NULL;
    }
    self->conn = (void *)(uintptr_t)conn;
    self->get_copy_data = (get_copy_data_fn)(uintptr_t)get;
    self->freemem = (freemem_fn)(uintptr_t)fre;
    self->consume = (consume_fn)(uintptr_t)consume;
    self->put_copy_data = (put_copy_data_fn)(uintptr_t)put;
    self->flush = (flush_fn)(uintptr_t)flush;
    Py_RETURN_NONE;
}

static int Turn_init(Turn *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist)) return -1;
    if (self->ctx == NULL && (self->ctx = EVP_CIPHER_CTX_new()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->tail_start = -1;
    self->sock = self->wake = self->dfd = -1;
    return 0;
}

static void Turn_dealloc(Turn *self) {
    if (self->ctx != NULL) EVP_CIPHER_CTX_free(self->ctx);  /* clears the key schedule */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define M(name, type) {#name, type, offsetof(Turn, name), 0, NULL}
static PyMemberDef Turn_members[] = {
    M(sock, T_INT), M(wake, T_INT), M(dfd, T_INT), M(err, T_INT),
    M(base, T_LONGLONG), M(seg_size, T_LONGLONG), M(received, T_LONGLONG),
    M(submitted, T_LONGLONG), M(verify_until, T_LONGLONG), M(file_size, T_LONGLONG),
    M(allocated, T_LONGLONG), M(index, T_LONGLONG), M(frame_size, T_LONGLONG),
    M(capacity, T_LONGLONG), M(tail_start, T_LONGLONG), M(tail_fill, T_LONGLONG),
    M(durable, T_LONGLONG), M(reported, T_LONGLONG), M(wal_end, T_LONGLONG),
    M(nbytes, T_LONGLONG), M(interval, T_DOUBLE), M(last_status, T_DOUBLE),
    M(last_state, T_DOUBLE), M(state_every, T_DOUBLE),
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Turn_methods[] = {
    {"run", (PyCFunction)Turn_run, METH_VARARGS, "Make turns until one needs Python."},
    {"key", (PyCFunction)Turn_key, METH_VARARGS,
     "Set the data key (b'' for plain frames), nonce prefix, digest."},
    {"connect", (PyCFunction)Turn_connect, METH_VARARGS, "Set the PGconn and libpq functions."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TurnType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "klio_wal_receiver._turn.Turn",
    .tp_basicsize = sizeof(Turn),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A synchronous standby's turns in native code (see pump.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Turn_init,
    .tp_dealloc = (destructor)Turn_dealloc,
    .tp_members = Turn_members,
    .tp_methods = Turn_methods,
};

static struct PyModuleDef turn_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_turn",
    .m_doc = "A synchronous standby's turns in native code.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__turn(void) {
    if (PyType_Ready(&TurnType) < 0) return NULL;
    PyObject *m = PyModule_Create(&turn_module);
    if (m == NULL) return NULL;
    Py_INCREF(&TurnType);
    if (PyModule_AddObject(m, "Turn", (PyObject *)&TurnType) < 0) {
        Py_DECREF(&TurnType);
        Py_DECREF(m);
        return NULL;
    }
    const char *names[] = {"STATE", "STOP", "END", "BROKEN", "SLOW", "NOFAST", "IOERR", "PENDING"};
    for (int i = 0; i < 8; i++)
        if (PyModule_AddIntConstant(m, names[i], i) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}
